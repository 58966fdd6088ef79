"""What a user sees: caption scores, the evaluation report (parsed, and rendered in headless Chromium), the
curves drawn by matplotlib, the console's line progress, the `ds-vlm` verbs, hub data specs offline."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ds_vlm.data.formats import ImageRef, Sample

ROOT = Path(__file__).resolve().parents[2]


def test_caption_scores_come_from_sacrebleu_and_rouge_score():
    from ds_vlm.eval.scores import corpus_scores, sample_scores

    same = sample_scores("A red circle on a blue square.", "A red circle on a blue square.")
    assert same == {"exact_match": 1.0, "bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0),
                    "rouge_l": pytest.approx(1.0)}
    near = sample_scores("A red circle on a green square.", "A red circle on a blue square.")
    far = sample_scores("Nothing here.", "A red circle on a blue square.")
    assert 0 < far["chrf"] < near["chrf"] < 100 and far["rouge_l"] < near["rouge_l"] < 1 and near["exact_match"] == 0
    totals = corpus_scores(["a b c d", "x y"], ["a b c d", "x z"])
    assert totals["exact_match"] == 0.5 and 0 < totals["bleu"] < 100 and 0 < totals["rouge_l"] < 1


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.rows = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if "href" in attrs or (tag in ("script", "link", "iframe") and (attrs.get("src") or attrs.get("href"))):
            self.links.append(attrs.get("href") or attrs.get("src"))
        if tag == "tr":
            self.rows += 1


def _report(tmp_path) -> tuple[Path, list]:
    from ds_vlm.eval.report import write_report

    colours = [(220, 20, 20), (20, 20, 220), (20, 200, 20)]
    samples = []
    for n, colour in enumerate(colours):
        path = tmp_path / f"img{n}.png"
        Image.new("RGB", (96, 64), colour).save(path)
        samples.append(Sample(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": "Describe <it>."}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
                              images=[ImageRef(path=str(path))], source="test.jsonl", index=n))
    rows = [{"source": "test.jsonl", "index": n, "reference": "A red square.", "answer": answer, "chrf": chrf,
             "bleu": 1.0, "rouge_l": 0.5, "exact_match": 0.0}
            for n, (answer, chrf) in enumerate((("A red square?", 80.0), ("Blue <b>", 10.0), ("Green.", 40.0)))]
    curves = tmp_path / "curves.png"
    Image.new("RGB", (300, 200), (250, 250, 250)).save(curves)
    page = tmp_path / "eval" / "step_4.html"
    write_report(str(page), rows, samples, "run: evaluation at step 4", {"lr": 2e-5}, {"chrf": 43.3}, str(curves))
    return page, colours


def test_the_report_is_one_page_with_every_image_embedded_worst_first(tmp_path):
    page, _ = _report(tmp_path)
    text = page.read_text()
    parser = _Page()
    parser.feed(text)
    assert parser.links == []  # nothing outside the page
    assert len(parser.images) == 4  # the curves and three thumbnails
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert text.index("Blue &lt;b&gt;") < text.index("Green.") < text.index("A red square?")  # worst chrF first
    assert "Describe &lt;it&gt;." in text and "<b>" not in text.replace("<b>chrf</b>", "")  # escaped
    assert parser.rows == 1 + 3 + 1  # header, three answers, the settings row


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (Debian's package `chromium`; .ci/run installs it)")
def test_the_report_renders_with_its_images_in_headless_chromium(tmp_path):
    page, colours = _report(tmp_path)
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1300,1800",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for colour in colours:  # each thumbnail is on screen: hundreds of pixels of its colour
        assert (np.abs(pixels - colour).max(axis=1) < 12).sum() > 500, colour


def test_curves_are_drawn_by_matplotlib_with_eval_points(tmp_path):
    from ds_vlm.runtime.curves import plot_curves, smoothed

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 5 * 0.97 ** s, "lr": 1e-4, "grad_norm": 2.0 / s, "tokens_per_s": 1000 + s,
              "tflops_per_gpu": 0.01, "mfu": None} for s in range(1, 101)]
    lines += [{"event": "eval", "step": s, "eval_loss": 5 * 0.97 ** s + 0.1, "exact_match": s / 100, "chrf": s / 2,
               "bleu": s / 3, "rouge_l": s / 100} for s in (50, 100)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "curves.png"
    assert plot_curves(str(metrics), str(out), title="demo")
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape[:2] == (900, 1170)
    orange = (np.abs(image - (255, 127, 14)).max(axis=2) < 30).sum()  # the eval loss and first score line
    assert orange > 50
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no pull to 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"event": "start"}) + "\n")
    assert not plot_curves(str(empty), str(tmp_path / "none.png"))


@pytest.mark.parametrize("low, high", [(0.25, 5.0), (0.02, 2.0), (2.1, 2.9), (3e-4, 10.0), (0.052, 0.098)])
def test_log_axes_label_major_ticks_only_and_labels_do_not_overlap(low, high):
    """curves.png's log panels (loss, gradient norm): plain numbers at the major ticks, at least two of them
    on any range, none at the minor ticks (they were every one labelled, piled on top of each other), and no
    two labels overlapping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ds_vlm.runtime.curves import readable_log_axis

    fig, ax = plt.subplots(figsize=(6.5, 3.3), dpi=90)  # one panel of curves.png
    ax.plot([1, 100], [high, low])
    ax.set_yscale("log")
    readable_log_axis(ax.yaxis, *ax.get_ylim())
    fig.canvas.draw()
    bottom, top = ax.get_ylim()

    def shown(ticks):
        return [t for t in ticks if bottom <= t.get_loc() <= top and t.label1.get_visible()]

    major, minor = shown(ax.yaxis.get_major_ticks()), shown(ax.yaxis.get_minor_ticks())
    labels = [t.label1.get_text() for t in major]
    assert all(t.label1.get_text() == "" for t in minor), [t.label1.get_text() for t in minor]
    assert len([x for x in labels if x]) >= 2, labels
    assert all("times" not in x and "^" not in x for x in labels), labels  # 0.5, not 5 x 10^-1
    boxes = sorted((t.label1.get_window_extent() for t in major if t.label1.get_text()), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:])), labels
    plt.close(fig)


def test_without_a_terminal_the_bar_is_a_line_every_5_percent(capsys):
    from ds_vlm.runtime.run_log import LineProgress

    bar = LineProgress(total=40, initial=0, every=2)
    for step in range(1, 41):
        bar.set_postfix(loss=f"{1 / step:.4f}")
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 20 and lines[0].startswith("train: step 2/40 (5%), loss=0.5000, ")
    assert lines[-1].startswith("train: step 40/40 (100%), loss=0.0250") and "\r" not in "".join(lines)


def test_ds_vlm_verbs(capsys):
    from ds_vlm.cli import VERBS, dispatch

    assert dispatch([]) == 0
    listed = capsys.readouterr().out
    verbs = ("train", "validate", "plan", "export", "evaluate", "demo")
    assert all(verb in listed for verb in verbs) and set(VERBS) >= set(verbs)
    assert dispatch(["nope"]) == 2 and "unknown verb 'nope'" in capsys.readouterr().err
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_:
            dispatch([verb, "--help"])
        assert exit_.value.code == 0
        assert "usage:" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-c", "from ds_vlm.cli import entry; entry()", "export", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "checkpoint_dir" in proc.stdout


def test_hf_specs_read_a_hub_layout_folder_offline(tmp_path, monkeypatch):
    """`hf:` through datasets.load_dataset, offline: a folder in the hub's layout (data/train-*.parquet and a
    README card) resolves as a hub dataset does; images stay bytes until read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ds_vlm.data.images import load_images
    from ds_vlm.data.sources import RecordIndex

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "pokemon-gpt4o-captions"
    (repo / "data").mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    rows = [{"conversations": [{"from": "human", "value": "<image>Describe."}, {"from": "gpt", "value": f"A {n}."}],
             "images": [{"bytes": buffer.getvalue(), "path": f"{n}.png"}]} for n in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), repo / "data" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# captions\n")
    records = RecordIndex(f"hf:{repo}#train")
    assert len(records) == 3
    sample = records.sample(2)
    assert sample.messages[-1]["content"][0]["text"] == "A 2." and sample.images[0].data == buffer.getvalue()
    assert load_images(sample)[0].getpixel((0, 0)) == (200, 30, 30)
    assert records.files[0].fingerprint() == RecordIndex(f"hf:{repo}").files[0].fingerprint()  # split: train
    with pytest.raises(ValueError, match=r"hf:.*#nope: cannot load the dataset.*offline"):
        RecordIndex(f"hf:{repo}#nope")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
