"""Evaluation during training: the eval loss over every eval record (token-level, all ranks), and greedy
answers to the first few with their caption scores (exact match, BLEU, chrF, ROUGE-L: scores.py); rank 0
appends the answers to samples.jsonl and writes OUTPUT_DIR/eval/step_N.html (eval_report.py)."""

from __future__ import annotations

import json
import os

from .data.batching import SFTDataset, make_loader
from .data.formats import DataError
from .data.plan import BatchPlan
from .eval_report import write_report
from .scores import corpus_scores, sample_scores


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

    def __call__(self, step: int) -> dict:
        self.engine.eval()
        try:
            return {**self.loss(), **self.answers(step)}
        finally:
            self.engine.train()

    def loss(self) -> dict:
        loader = make_loader(self.eval_set, self.plan, self.dp_rank, 0, self.plan.steps_per_epoch, self.collator, 0)
        return self.runner.eval_loss(loader)

    def answers(self, step: int) -> dict:
        """Greedy answers to the first n_generate eval records (all ranks run generate together, as ZeRO-3
        needs); rank 0 appends them to samples.jsonl. Returns exact-match accuracy."""
        from .generation import generate_answers, reference

        samples = []
        for i in self.eval_set.indices[:self.n_generate]:
            try:
                samples.append(self.eval_set.records.sample(int(i)))
            except DataError:  # --preflight off: a bad record is left out here too
                pass
        if not samples:
            return {}
        answers = generate_answers(self.engine.module, self.processor, samples, max_new_tokens=64,
                                   video_sampling=self.video_sampling,
                                   synced_gpus=self.engine.zero_optimization_partition_weights())
        references = [reference(s) for s in samples]
        rows = [{"step": step, "source": s.source, "index": s.index, "reference": r, "answer": a,
                 "correct": a == r, **sample_scores(a, r)} for s, a, r in zip(samples, answers, references)]
        totals = corpus_scores(answers, references)
        if self.rank == 0:
            with open(os.path.join(self.output_dir, "samples.jsonl"), "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            write_report(os.path.join(self.output_dir, "eval", f"step_{step}.html"), rows, samples,
                         f"{os.path.basename(os.path.abspath(self.output_dir))}: evaluation at step {step}",
                         self.settings, totals, self.curves_png)
        return totals
