"""An evaluation report to look at: one self-contained HTML page (no link leaves it: images are embedded as
data: URIs) with each evaluated record's image thumbnails, its prompt, the reference, the generated answer
and its scores, worst first by chrF, under the run's settings and its curves.

Written by training at each evaluation with generation (OUTPUT_DIR/eval/step_N.html) and by
`ds-vlm evaluate --report FILE.html`.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Optional

THUMBNAIL = 256  # the longer side of an embedded image, in pixels


def _data_uri(image, size: int = THUMBNAIL) -> str:
    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _prompt(sample) -> str:
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    lines = []
    for m in sample.messages[:last]:
        text = "".join(p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in m["content"])
        lines.append(f"{m['role']}: {text}")
    return "\n".join(lines)


def _images(sample) -> list[str]:
    from ds_vlm.data.formats import DataError
    from ds_vlm.data.images import load_image

    out = []
    for ref in sample.images:
        try:
            out.append(_data_uri(load_image(ref, sample)))
        except DataError:
            out.append("")
    return out


def write_report(path: str, rows: list[dict], samples: list, title: str, settings: Optional[dict] = None,
                 totals: Optional[dict] = None, curves_png: Optional[str] = None) -> str:
    """`rows[i]` (reference, answer, scores: exact_match, bleu, chrf, rouge_l) is the answer to `samples[i]`.
    Returns `path`."""
    escape = html.escape
    order = sorted(range(len(rows)), key=lambda i: rows[i].get("chrf", 0.0))
    parts = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;"
             "width:100%}td,th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}"
             "pre{white-space:pre-wrap;margin:0}img.thumb{max-width:256px;max-height:256px;display:block;"
             "margin-bottom:4px}.scores{white-space:nowrap}</style></head><body>", f"<h1>{escape(title)}</h1>"]
    if totals:
        parts.append("<p>" + ", ".join(f"<b>{escape(k)}</b> {v:.4g}" for k, v in totals.items()
                                       if isinstance(v, (int, float))) + f" over {len(rows)} answers</p>")
    if settings:
        parts.append("<details><summary>settings</summary><table>" + "".join(
            f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in settings.items())
            + "</table></details>")
    if curves_png and os.path.isfile(curves_png):
        from PIL import Image

        with Image.open(curves_png) as curves:
            parts.append(f"<p><img alt='training curves' src='{_data_uri(curves.convert('RGB'), 1200)}'></p>")
    parts.append("<table><tr><th>#</th><th>image</th><th>prompt</th><th>reference</th><th>answer</th>"
                 "<th>scores</th></tr>")
    for i in order:
        row, sample = rows[i], samples[i]
        images = "".join(f"<img class='thumb' alt='image {n} of record {row.get('index')}' src='{uri}'>" if uri
                         else "<i>image not readable</i>" for n, uri in enumerate(_images(sample)))
        if sample.videos:
            images += "".join(f"<i>video {escape(v.describe())}</i>" for v in sample.videos)
        scores = "<br>".join(f"{k} {row[k]:.3g}" for k in ("chrf", "bleu", "rouge_l", "exact_match") if k in row)
        parts.append(f"<tr><td>{escape(os.path.basename(str(row.get('source', ''))))} #{row.get('index')}</td>"
                     f"<td>{images}</td><td><pre>{escape(_prompt(sample))}</pre></td>"
                     f"<td><pre>{escape(row['reference'])}</pre></td><td><pre>{escape(row['answer'])}</pre></td>"
                     f"<td class='scores'>{scores}</td></tr>")
    parts.append("</table></body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
    return path
