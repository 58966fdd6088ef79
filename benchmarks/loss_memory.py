"""The loss's extra peak memory: the old full-logits loss against the label-rows chunked loss.

Qwen3-VL-2B's head (hidden 2048, vocabulary 151,936; bf16 on a GPU, fp32 on a CPU, whose bf16 matmuls run at
~0.2 GFLOP/s here), a sequence of N tokens of which 10% carry labels: forward + backward of each loss in its own
process, from hidden states and a head weight already in memory. Extra peak = the process's peak memory during
the loss (CUDA: max allocated; CPU: VmHWM) minus what it held before; both losses return the head weight's
gradient, so both peaks include one weight-sized buffer. The old loss (`logits[:, :-1].float()` + cross-entropy
over every position) needs ~7x the bf16 logits (~3x the fp32 ones); where that does not fit the machine it is
measured at two smaller N and extended along the line through them (its peak is a constant plus a part linear in
N; the report says which numbers were measured).
"""

from __future__ import annotations

import json
import subprocess
import sys

HIDDEN, VOCAB, LABEL_SHARE = 2048, 151_936, 0.10


def _rss_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2**20


def measure(kind: str, n_tokens: int, device: str) -> dict:
    """One loss, forward + backward, in this process: its extra peak memory in GB and the time it took."""
    import time

    import torch

    from ds_vlm.train.loss import LabelRows, chunked_loss_sum

    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hidden = (torch.randn(1, n_tokens, HIDDEN, device=dev) * 0.02).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device=dev) * 0.02).to(dtype).requires_grad_()
    labels = torch.full((1, n_tokens), -100)
    answer = int(n_tokens * LABEL_SHARE)
    labels[0, -answer:] = torch.randint(0, VOCAB, (answer,))
    labels = labels.to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_gb("VmRSS:")
    start = time.perf_counter()
    if kind == "old":
        logits = torch.nn.functional.linear(hidden, weight)
        shifted = logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(shifted.reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        del logits, shifted
    else:
        rows = LabelRows.from_labels(labels.cpu()).to(dev)
        loss = chunked_loss_sum(hidden.flatten(0, 1).index_select(0, rows.rows), weight, None, rows.targets)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = _rss_gb("VmHWM:")
    return {"kind": kind, "tokens": n_tokens, "dtype": str(dtype).split(".")[-1], "extra_gb": peak - before,
            "seconds": time.perf_counter() - start, "loss": float(loss)}


def _in_subprocess(kind: str, n_tokens: int, device: str) -> dict:
    code = (f"import json; from benchmarks.loss_memory import measure; "
            f"print(json.dumps(measure({kind!r}, {n_tokens}, {device!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"kind": kind, "tokens": n_tokens, "error": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_gb(device: str) -> float:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 1e9
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def run(n_tokens: int = 16_384, device: str = "cpu", small: tuple[int, int] = (2048, 4096)) -> dict:
    """The new loss at n_tokens; the old one at n_tokens if it fits, else at the two `small` sizes, extended
    along the line through them."""
    old_estimate = 15 * n_tokens * VOCAB / 1e9  # ~7x the bf16 logits, ~4x the fp32 ones
    new = _in_subprocess("new", n_tokens, device)
    if old_estimate < 0.8 * available_gb(device):
        old = _in_subprocess("old", n_tokens, device)
        old_points, old_extra, measured = [old], old.get("extra_gb"), True
    else:
        old_points = [_in_subprocess("old", n, device) for n in small]
        old_extra, measured = None, False
        if all("extra_gb" in p for p in old_points):
            (n1, e1), (n2, e2) = ((p["tokens"], p["extra_gb"]) for p in old_points)
            old_extra = e2 + (e2 - e1) / (n2 - n1) * (n_tokens - n2)
    ratio = new["extra_gb"] / old_extra if old_extra and "extra_gb" in new else None
    return {"tokens": n_tokens, "hidden": HIDDEN, "vocab": VOCAB, "label_share": LABEL_SHARE, "device": device,
            "new": new, "old_points": old_points, "old_extra_gb": old_extra, "old_measured_at_tokens": measured,
            "ratio": ratio}


def render(result: dict) -> str:
    dtype = result["new"].get("dtype", "?")
    lines = [f"Loss memory (hidden {result['hidden']}, vocabulary {result['vocab']}, {dtype}, "
             f"{result['tokens']} tokens, {result['label_share']:.0%} labels; forward + backward; {result['device']})"]
    for point in result["old_points"]:
        lines.append(f"  old full-logits loss at {point['tokens']:>6} tokens: "
                     + (f"extra peak {point['extra_gb']:.2f} GB, {point['seconds']:.1f} s" if "extra_gb" in point
                        else f"failed: {point['error']}"))
    new = result["new"]
    lines.append(f"  new label-rows loss at {new['tokens']:>6} tokens: "
                 + (f"extra peak {new['extra_gb']:.2f} GB, {new['seconds']:.1f} s" if "extra_gb" in new
                    else f"failed: {new['error']}"))
    if result["old_extra_gb"] is not None and not result["old_measured_at_tokens"]:
        lines.append(f"  old loss at {result['tokens']} tokens, extended along the line through the two points "
                     f"above (it does not fit this machine): {result['old_extra_gb']:.1f} GB")
    if result["ratio"] is not None:
        lines.append(f"  new / old extra peak: {result['ratio']:.3f}")
    return "\n".join(lines)


def target(result: dict) -> tuple[bool, str]:
    ratio = result["ratio"]
    return (ratio is not None and ratio <= 0.1,
            f"the label-rows loss's extra peak memory <= 1/10 of the full-logits loss's at {result['tokens']} "
            f"tokens: {'not measured' if ratio is None else f'{ratio:.3f}'}")
