"""Caption scores of greedy answers on held-out records, from an exported HF folder.

    ds-vlm evaluate --model OUTPUT_DIR/hf --data test.jsonl [--show 5] [--out answers.jsonl]
                    [--report report.html] [--min_accuracy 0.9]

For each record the last assistant turn is the reference; everything before it is the prompt. Prints
exact-match accuracy, BLEU, chrF and ROUGE-L (scores.py); --out writes every answer with its scores as
JSONL, --report an HTML page with each image, prompt, reference and answer, worst first (eval_report.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.videos import VideoSampling
from ds_vlm.eval.generation import generate_answers, reference
from ds_vlm.eval.report import write_report
from ds_vlm.eval.scores import corpus_scores, sample_scores
from ds_vlm.runtime.console import quiet_console


def evaluate_export(model_dir: str, data: str, limit: int = 0, out: str = "",
                    video_sampling: VideoSampling | None = None, report: str = "") -> dict:
    """Greedy answers of the exported model in `model_dir` to the records of `data` (the first `limit`), scored
    against each record's last assistant turn: {accuracy, correct, total (exact match), rows (one per record, its
    answer and scores), scores (corpus_scores: exact match, BLEU, chrF, ROUGE-L)}."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = RecordIndex(data.split(","))
    samples = [records.sample(i) for i in range(len(records) if not limit else min(limit, len(records)))]
    answers = generate_answers(model, processor, samples, video_sampling=video_sampling)
    references = [reference(s) for s in samples]
    rows = [{"source": s.source, "index": s.index, "reference": r, "answer": a, "correct": a == r,
             **sample_scores(a, r)} for s, a, r in zip(samples, answers, references)]
    if out:
        with open(out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    correct = sum(r["correct"] for r in rows)
    scores = corpus_scores(answers, references)
    if report:
        write_report(report, rows, samples, f"{model_dir}: {data}", {"model": model_dir, "data": data}, scores)
    return {"accuracy": correct / max(1, len(rows)), "correct": correct, "total": len(rows), "rows": rows,
            "scores": scores}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported HF folder (OUTPUT_DIR/hf)")
    parser.add_argument("--data", required=True, help="records whose last assistant turn is the reference")
    parser.add_argument("--limit", type=int, default=0, help="only the first N records")
    parser.add_argument("--show", type=int, default=5, help="print this many wrong answers")
    parser.add_argument("--out", default="", help="write every answer as JSONL here")
    parser.add_argument("--report", default="", help="write an HTML report (images, prompts, answers) here")
    parser.add_argument("--min_accuracy", type=float, default=0.0, help="exit 1 below this accuracy")
    parser.add_argument("--video_fps", type=float, default=VideoSampling.fps, help="as the run was trained with")
    parser.add_argument("--video_max_frames", type=int, default=VideoSampling.max_frames)
    args = parser.parse_args(argv)
    quiet_console(rank=0)  # a tool: its own warnings once, no bars redrawn into a log
    result = evaluate_export(args.model, args.data, args.limit, args.out,
                         VideoSampling(args.video_fps, args.video_max_frames), args.report)
    for row in [r for r in result["rows"] if not r["correct"]][:args.show]:
        print(f"  wrong: record {row['index']}: expected {row['reference']!r}, got {row['answer']!r}")
    print(f"exact-match caption accuracy: {result['accuracy']:.1%} ({result['correct']}/{result['total']})")
    scores = result["scores"]
    if scores:
        print(f"BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}, ROUGE-L {scores['rouge_l']:.4f}"
              + (f"; report: {args.report}" if args.report else ""))
    return 0 if result["accuracy"] >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
