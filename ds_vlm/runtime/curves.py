"""Training curves drawn by matplotlib (the headless Agg backend): OUTPUT_DIR/curves.png, written at each
evaluation and at the end from metrics.jsonl.

Panels: the loss on a log axis (the raw steps faint, a moving average over them (smoothing_for), the eval loss
as points where it was measured); the eval caption scores (exact match, chrF, BLEU, ROUGE-L, all as 0-100);
the learning rate; the gradient norm (log axis); tokens/s and MFU (%, where the GPU's peak is known).
"""

from __future__ import annotations

import json
import math


def smoothing_for(n_points: int) -> float:
    """The moving average's weight on the past: about n/20 steps of memory (none for a 20-step run, 0.98 at
    1000 steps and beyond), so that the smoothed line follows a short run instead of lagging it."""
    return min(0.98, max(0.0, 1 - 20 / max(1, n_points)))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
              and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average, bias-corrected (the first points are not pulled towards 0)."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** n))
    return out


def log_subs(low: float, high: float) -> tuple[float, ...]:
    """Which multiples of each power of ten carry a labelled (major) tick on a log axis from `low` to `high`:
    over 3 decades or more the powers alone, over half a decade to 3 the 1-2-5 series, over less every integer
    multiple (0.3, 0.4, 0.5), so that a short range still shows at least one number and a long one is not
    crowded."""
    decades = math.log10(high / low) if 0 < low < high else 0.0
    if decades >= 3:
        return (1.0,)
    if decades >= 0.5:
        return (1.0, 2.0, 5.0)
    return tuple(float(k) for k in range(1, 10))


def readable_log_axis(axis, low: float, high: float) -> None:
    """Plain numbers (0.5, 2, 20; not 5 x 10^-1) at the major ticks of log_subs, and unlabelled minor ticks at
    every other integer multiple (matplotlib's default labels minor ticks on short log ranges, and a
    formatter set for both piles every minor label on top of its neighbours)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=log_subs(low, high)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4g}"))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(float(k) for k in range(2, 10))))
    axis.set_minor_formatter(NullFormatter())


def plot_curves(metrics_file: str, out_png: str, title: str = "") -> bool:
    """Draw the run's curves; False (and nothing written) when metrics.jsonl holds no step yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_file) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    steps = {r["step"]: r for r in lines if "event" not in r and "step" in r}  # a resumed run re-logs: newest
    rows = [steps[s] for s in sorted(steps)]
    evals = sorted(({**e} for e in lines if e.get("event") == "eval"), key=lambda e: e["step"])
    if not rows:
        return False
    fig, axes = plt.subplots(3, 2, figsize=(13, 10), constrained_layout=True)
    fig.suptitle(f"{title}: {len(rows)} steps" if title else f"{len(rows)} steps")
    ax = axes[0, 0]
    x, loss = _series(rows, "loss")
    positive = [(s, v) for s, v in zip(x, loss) if v > 0]
    if positive:
        ax.plot([s for s, _ in positive], [v for _, v in positive], color="tab:blue", alpha=0.25, lw=0.8,
                label="train loss")
        weight = smoothing_for(len(positive))
        ax.plot([s for s, _ in positive], smoothed([v for _, v in positive], weight), color="tab:blue", lw=1.8,
                label=f"train loss, moving average ({weight:.2f})")
        ax.set_yscale("log")
    ex, eval_loss = _series(evals, "eval_loss")
    if ex:
        ax.plot(ex, eval_loss, "o-", color="tab:orange", label="eval loss")
    ax.set(title="loss (token-level mean, log scale)", xlabel="step", ylabel="loss (nats/token)")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[0, 1]
    drawn = False
    for key, scale, label in (("exact_match", 100, "exact match (%)"), ("chrf", 1, "chrF"), ("bleu", 1, "BLEU"),
                              ("rouge_l", 100, "ROUGE-L F (x100)")):
        sx, values = _series(evals, key)
        if sx:
            ax.plot(sx, [v * scale for v in values], "o-", label=label)
            drawn = True
    ax.set(title="eval caption scores", xlabel="step", ylabel="score (0-100)")
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no eval with generation (--eval_data, --eval_generate)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="gray")
    for ax, key, label, log in ((axes[1, 0], "lr", "learning rate", False),
                                (axes[1, 1], "grad_norm", "gradient norm (before clipping, log scale)", True),
                                (axes[2, 0], "tokens_per_s", "tokens/s (all ranks)", False)):
        sx, values = _series(rows, key)
        if sx:
            ax.plot(sx, values, color="tab:green" if key == "lr" else "tab:purple", lw=1.2)
            if log and all(v > 0 for v in values):
                ax.set_yscale("log")
        ax.set(title=label, xlabel="step", ylabel=label.split(" (")[0])
    ax = axes[2, 1]
    sx, mfu = _series(rows, "mfu")
    if sx:
        ax.plot(sx, [100 * v for v in mfu], color="tab:red", lw=1.2)
    else:
        sx, tflops = _series(rows, "tflops_per_gpu")
        ax.plot(sx, tflops, color="tab:red", lw=1.2)
        ax.text(0.02, 0.92, "no peak known for this device: TFLOP/s shown", transform=ax.transAxes, fontsize=8,
                color="gray")
    ax.set(title="MFU (%)" if _series(rows, "mfu")[0] else "model TFLOP/s per GPU", xlabel="step")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_yscale() == "log":
            readable_log_axis(ax.yaxis, *ax.get_ylim())
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return True
