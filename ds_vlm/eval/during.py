"""Evaluation during training: the eval loss over every eval record (token-level, all ranks), and greedy
answers to the first few with their caption scores (exact match, BLEU, chrF, ROUGE-L: scores.py). `write` then
appends the answers to samples.jsonl and writes OUTPUT_DIR/eval/step_N.html (eval_report.py) on rank 0: the
trainer calls it once the evaluation's scores are logged and the curves redrawn, so that the page embeds
curves that show its own evaluation."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from ds_vlm.data.batching import SFTDataset, make_loader
from ds_vlm.data.formats import DataError
from ds_vlm.data.plan import BatchPlan
from ds_vlm.eval.report import write_report
from ds_vlm.eval.scores import corpus_scores, sample_scores


@dataclass
class Answers:
    """The greedy answers of one evaluation: a row per answered sample (reference, answer, scores) and the
    corpus-level scores."""
    step: int
    rows: list[dict]
    samples: list
    totals: dict


class Evaluator:
    def __init__(self, eval_set: SFTDataset, collator, runner, engine, processor, video_sampling, output_dir: str,
                 micro_batch_size: int, n_generate: int, dp_rank: int, dp_size: int, seed: int, rank: int):
        self.eval_set, self.collator, self.runner, self.engine = eval_set, collator, runner, engine
        self.processor, self.video_sampling, self.output_dir = processor, video_sampling, output_dir
        self.n_generate, self.rank = n_generate, rank
        self.dp_rank = dp_rank
        self.plan = BatchPlan(len(eval_set), micro_batch_size, 1, dp_size, seed)
        self.settings: dict = {}  # shown on the report's top (the trainer sets the run's config)
        self.curves_png = os.path.join(output_dir, "curves.png")

    def __call__(self, step: int) -> tuple[dict, Optional[Answers]]:
        """(the scores: eval loss, and the caption scores where answers were generated; the answers)."""
        self.engine.eval()
        try:
            loss, answers = self.loss(), self.answers(step)
        finally:
            self.engine.train()
        return {**loss, **(answers.totals if answers else {})}, answers

    def loss(self) -> dict:
        loader = make_loader(self.eval_set, self.plan, self.dp_rank, 0, self.plan.steps_per_epoch, self.collator, 0)
        return self.runner.eval_loss(loader)

    def answers(self, step: int) -> Optional[Answers]:
        """Greedy answers to the first n_generate eval records (all ranks run generate together, as ZeRO-3
        needs), scored; None when there is none to answer."""
        from ds_vlm.eval.generation import generate_answers, reference

        samples = []
        for i in self.eval_set.indices[:self.n_generate]:
            try:
                samples.append(self.eval_set.records.sample(int(i)))
            except DataError:  # --preflight off: a bad record is left out here too
                pass
        if not samples:
            return None
        answers = generate_answers(self.engine.module, self.processor, samples, max_new_tokens=64,
                                   video_sampling=self.video_sampling,
                                   synced_gpus=self.engine.zero_optimization_partition_weights())
        references = [reference(s) for s in samples]
        rows = [{"step": step, "source": s.source, "index": s.index, "reference": r, "answer": a,
                 "correct": a == r, **sample_scores(a, r)} for s, a, r in zip(samples, answers, references)]
        return Answers(step, rows, samples, corpus_scores(answers, references))

    def write(self, answers: Answers) -> Optional[str]:
        """On rank 0: the answers appended to samples.jsonl, and the evaluation's report page, which embeds
        curves.png as it is now (draw it first). The page's path (None on other ranks)."""
        if self.rank != 0:
            return None
        with open(os.path.join(self.output_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in answers.rows)
        step = answers.step
        return write_report(os.path.join(self.output_dir, "eval", f"step_{step}.html"), answers.rows,
                            answers.samples,
                            f"{os.path.basename(os.path.abspath(self.output_dir))}: evaluation at step {step}",
                            self.settings, answers.totals, self.curves_png)
