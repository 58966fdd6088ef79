"""`ds-vlm check-model --model M [--out check.json]`: whether M's architecture trains here, in about a minute on a
CPU, with no weights.

It builds a tiny random instance of M's architecture from M's config (each tower cut to 2 blocks and narrowed; the
image geometry, token ids and vocabulary kept), saves it beside M's own processor and chat template, writes a few
shape-captioning records (every other one text-only), then runs each check on its own, timed:

    load              the tiny instance built, saved and loaded back through the model's adapter
    train_zero3       2 ranks, ZeRO-3 (every parameter partitioned), 3 steps of mixed image/text batches, the last
                      vision block trained and the others frozen, a checkpoint after step 2
    resume            the run again from its step-2 checkpoint: step 3's loss and every exported tensor equal the
                      uninterrupted run's (the optimizer's moments and the learning rate came back too)
    packed_vs_padded  the loss of 3 samples packed in one row equals their loss padded (or packing refused, why)
    sequence_parallel the first step's loss with --sequence_parallel 2 on 2 ranks equals 1 rank's
    lora              LoRA on the language tower: only adapter weights get gradients, the loss is finite
    export_generate   train_zero3's export reloaded, generating for an image prompt and a text-only prompt
    plan              the planner's trace of the run (peak memory per rank)

Each check is ok, refused (the trainer said why, in one line) or failed (with the error); a check that needs an
earlier one that did not pass is skipped. The table is printed and written as JSON: {model, model_type, adapter,
checks: [{name, status, seconds, detail}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from ds_vlm.models.check_tiny import build_tiny, write_data

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Check:
    name: str
    status: str  # ok | refused | failed | skipped
    seconds: float
    detail: str


class Refused(Exception):
    """The trainer refused the check's configuration, with its one-line reason."""


# -- runs --------------------------------------------------------------------------------------------------------
def zero3_json(out: Path) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = out / "zero3_all_partitioned.json"
    path.write_text(json.dumps(ds))
    return path


def train(ranks: int, flags: list[str], out: Path, timeout: int = 600, resume: str = "none") -> list[float]:
    """launch/train.py on `ranks` CPU ranks (DeepSpeed's launcher); the losses per step. Exit status 2 (an error
    the trainer explains) is Refused with its line; anything else fails with the log's tail. `resume`: the trainer's
    --resume (none: a fresh run, whatever `out` holds)."""
    from ds_vlm.runtime.distributed import free_port
    from ds_vlm.runtime.launcher import launcher, remove_shm_buffers

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = out.parent / f"{out.name}.log"
    command = [*launcher(ranks, port), str(ROOT / "launch" / "train.py"), *flags, "--output_dir", str(out),
               "--num_workers", "0", "--plan_at_start", "false", "--resume", resume, "--dist_timeout_s", "120"]
    try:
        with open(log, "w") as f:
            code = subprocess.run(command, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
    finally:
        remove_shm_buffers(port)
    text = log.read_text(errors="replace")
    errors = [line.split("ds-vlm: error: ", 1)[1] for line in text.splitlines() if "ds-vlm: error: " in line]
    if errors:
        raise Refused(errors[-1])
    if code:
        raise RuntimeError(f"exit {code}: {' | '.join(text.strip().splitlines()[-3:])[-400:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "step" in r and "event" not in r]


class Checker:
    def __init__(self, model: str, work: Path, trust_remote_code: bool = False):
        self.model, self.work, self.trust = model, work, trust_remote_code
        self.tiny, self.data = work / "model", work / "data"
        self.checks: list[Check] = []
        self.ds = None

    def run(self, name: str, check, needs: tuple[str, ...] = ()) -> None:
        began = time.perf_counter()
        missing = [n for n in needs if not any(c.name == n and c.status == "ok" for c in self.checks)]
        if missing:
            self.checks.append(Check(name, "skipped", 0.0, f"needs {', '.join(missing)}"))
            return
        try:
            status, detail = "ok", check()
        except Refused as why:
            status, detail = "refused", str(why)
        except Exception as err:  # noqa: BLE001 - a failed check is reported, and the others still run
            status, detail = "failed", f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
            if os.environ.get("DS_VLM_CHECK_TRACEBACK"):
                traceback.print_exc()
        self.checks.append(Check(name, status, round(time.perf_counter() - began, 1), detail))
        print(f"  {name:<18} {status:<8} {self.checks[-1].seconds:>6.1f} s  {detail}", flush=True)

    # -- the checks ------------------------------------------------------------------------------------------
    def load(self) -> str:
        from ds_vlm.config import ModelConfig
        from ds_vlm.models.loading import load_model, prepare_for_training
        from ds_vlm.train.ds_config import DSSettings

        built = build_tiny(self.model, self.tiny, self.trust)
        self.records = write_data(self.data)
        self.ds = zero3_json(self.work)
        loaded = load_model(ModelConfig(path=str(self.tiny), trust_remote_code=self.trust), DSSettings(), "sdpa")
        # the adapter's parts, or its refusal; no checkpointing: the checks below compare forwards
        prepare_for_training(loaded.model, loaded.adapter, ModelConfig(), checkpointing=False)
        self.loaded = loaded
        return f"{type(loaded.adapter).__name__} ({loaded.adapter.family}); {built}"

    def common(self) -> list[str]:
        return ["--model", str(self.tiny), "--train_data", str(self.records), "--deepspeed", str(self.ds),
                "--lr", "1e-3", "--warmup_ratio", "0", "--max_length", "4096"]

    def zero3_flags(self) -> list[str]:
        return [*self.common(), "--max_steps", "3", "--save_steps", "2", "--micro_batch_size", "2",
                "--train_vision", "last:1"]

    def train_zero3(self) -> str:
        losses = train(2, self.zero3_flags(), self.work / "zero3")
        if len(losses) != 3 or not all(map(_finite, losses)):
            raise RuntimeError(f"losses {losses}")
        self.zero3_losses = losses
        return f"losses {', '.join(f'{x:.4f}' for x in losses)}"

    def resume(self) -> str:
        """train_zero3's run copied without its last checkpoint and export, as after a crash in step 3, and run
        again: it resumes at step 2 and must end where the uninterrupted run did."""
        import torch
        from safetensors.torch import load_file

        done, again = self.work / "zero3", self.work / "resumed"
        shutil.rmtree(again, ignore_errors=True)
        shutil.copytree(done, again, ignore=shutil.ignore_patterns("hf", "step_00000003"))
        (again / "metrics.jsonl").write_text("")
        losses = train(2, self.zero3_flags(), again, resume="auto")
        if len(losses) != 1 or abs(losses[0] - self.zero3_losses[2]) > 1e-6 * max(1.0, abs(losses[0])):
            raise RuntimeError(f"resumed at step 2: losses {losses}, uninterrupted step 3 {self.zero3_losses[2]:.6f}")
        tensors = [{k: v for f in sorted((run / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
                   for run in (done, again)]
        differ = sorted(k for k in tensors[0] if k not in tensors[1]
                        or not torch.allclose(tensors[0][k].float(), tensors[1][k].float(), rtol=1e-6, atol=1e-7))
        if differ or tensors[0].keys() != tensors[1].keys():
            raise RuntimeError(f"the resumed export differs from the uninterrupted one in {differ[:3] or 'its names'}")
        return f"step 3's loss {losses[0]:.6f} and all {len(tensors[0])} exported tensors as uninterrupted"

    def packed_vs_padded(self) -> str:
        import torch

        from ds_vlm.data.batching import Collator, SFTDataset
        from ds_vlm.data.encode import Encoder
        from ds_vlm.data.sources import RecordIndex
        from ds_vlm.train.loss import LabelLoss, LabelRows

        model, adapter = self.loaded.model, self.loaded.adapter
        refusal = adapter.packing_refusal(model.config)
        if refusal:
            raise Refused(refusal)
        encoder = Encoder(self.loaded.processor, adapter, 4096)
        dataset = SFTDataset(RecordIndex([str(self.records)]), encoder)
        samples = [dataset[i] for i in (0, 1, 2)]
        padded = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())(samples)
        packed = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), adapter.position_ids(model.config),
                          packing=True)(samples)
        model.eval()
        with torch.no_grad():
            a, b = (LabelLoss(model).loss_of(model, m.inputs, LabelRows.from_labels(m.labels))
                    for m in (padded, packed))
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"packed loss {float(b):.6f} != padded {float(a):.6f}")
        return f"loss {float(a):.5f} both ways"

    def sequence_parallel(self) -> str:
        refusal = self.loaded.adapter.sequence_parallel_refusal(self.loaded.model.config)
        if refusal:
            raise Refused(refusal)
        flags = [*self.common(), "--max_steps", "1", "--micro_batch_size", "1"]
        one = train(1, flags, self.work / "sp1")
        two = train(2, [*flags, "--sequence_parallel", "2"], self.work / "sp2")
        if abs(one[0] - two[0]) > 1e-3 * max(1.0, abs(one[0])):
            raise RuntimeError(f"first loss {two[0]:.5f} with SP 2, {one[0]:.5f} on 1 rank")
        return f"first loss {two[0]:.5f} (SP 2) = {one[0]:.5f} (1 rank)"

    def lora(self) -> str:
        import torch

        from ds_vlm.config import ModelConfig
        from ds_vlm.data.batching import Collator, SFTDataset
        from ds_vlm.data.encode import Encoder
        from ds_vlm.data.sources import RecordIndex
        from ds_vlm.models.loading import prepare_for_training

        model, adapter = self.loaded.model, self.loaded.adapter
        config = ModelConfig(path=str(self.tiny), lora_rank=4, train_projector=False)
        # the loaded model is prepared already (load): its family changes are not made twice
        peft_model = prepare_for_training(model, adapter, config, family_changes=False, checkpointing=False).trained
        encoder = Encoder(self.loaded.processor, adapter, 4096)
        dataset = SFTDataset(RecordIndex([str(self.records)]), encoder)
        micro = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())([dataset[0], dataset[1]])
        model.train()
        logits = peft_model(**micro.inputs).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), micro.labels[:, 1:].flatten())
        loss.backward()
        graded = [n for n, p in peft_model.named_parameters() if p.grad is not None]
        value = float(loss.detach())
        if not graded or any("lora_" not in n for n in graded) or not _finite(value):
            raise RuntimeError(f"loss {value}, gradients on {graded[:3]}")
        return f"{len(graded)} LoRA tensors get gradients, nothing else; loss {value:.4f}"

    def export_generate(self) -> str:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ds_vlm.data.sources import RecordIndex
        from ds_vlm.eval.generation import generate_answers

        path = self.work / "zero3" / "hf"
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        records = RecordIndex([str(self.records)])
        answers = generate_answers(model, AutoProcessor.from_pretrained(path), [records.sample(0), records.sample(1)],
                                   max_new_tokens=4)
        return f"reloaded from {path.name}/; answers {answers}"

    def plan(self) -> str:
        from ds_vlm.memplan.cli import plan

        report = plan(["--model", str(self.tiny), "--deepspeed", str(self.ds), "--world_size", "2", "--device", "cpu",
                       "--micro_batch_size", "2", "--max_length", "1024", "--gpu_memory_gb", "16"])
        if report is None:
            raise Refused("the planner refused (see its line above)")
        return f"peak {report['peak_gb_per_rank']:.3f} GB per rank on 2 ranks, fits: {report['fits']}"

    def all(self) -> list[Check]:
        self.run("load", self.load)
        self.run("train_zero3", self.train_zero3, ("load",))
        self.run("resume", self.resume, ("train_zero3",))
        self.run("packed_vs_padded", self.packed_vs_padded, ("load",))
        self.run("sequence_parallel", self.sequence_parallel, ("load",))
        self.run("lora", self.lora, ("load",))
        self.run("export_generate", self.export_generate, ("train_zero3",))
        self.run("plan", self.plan, ("load",))
        return self.checks


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a model folder (config, processor, tokenizer; no weights "
                                                     "needed)")
    parser.add_argument("--all_types", action="store_true", help="instead: every image-text-to-text type of the "
                        "installed transformers, built from its default config on the meta device (towers, packing)")
    parser.add_argument("--out", default="", help="write the checks as JSON here")
    parser.add_argument("--work", default="", help="keep the tiny model, data and logs here (default: a temporary "
                                                   "folder, removed)")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    if args.all_types:
        from ds_vlm.models.check_types import markdown, survey

        rows = survey()
        print(markdown(rows))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
        return 0
    if not args.model:
        parser.error("--model (or --all_types)")
    from ds_vlm.runtime.console import quiet_console

    quiet_console(rank=0)
    work = Path(args.work or tempfile.mkdtemp(prefix="ds_vlm_check_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"ds-vlm check-model {args.model} (work folder {work})", flush=True)
    began = time.perf_counter()
    try:
        checks = Checker(args.model, work, args.trust_remote_code).all()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    model_type = json.loads((Path(args.model) / "config.json").read_text()).get("model_type") \
        if (Path(args.model) / "config.json").is_file() else None
    report = {"model": args.model, "model_type": model_type, "seconds": round(time.perf_counter() - began, 1),
              "checks": [asdict(c) for c in checks]}
    print(render(checks))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if all(c.status in ("ok", "refused") for c in checks) else 1


def render(checks: list[Check]) -> str:
    lines = [f"{'check':<18} {'status':<8} {'seconds':>7}  detail"]
    lines += [f"{c.name:<18} {c.status:<8} {c.seconds:>7.1f}  {c.detail}" for c in checks]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
