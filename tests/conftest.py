"""Shared fixtures: a tiny offline Qwen3-VL, small datasets, and a runner for real multi-rank runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The data cache of every test (and of the runs they start): a session folder, never ~/.cache."""
    path = tmp_path_factory.mktemp("data_cache")
    os.environ["DS_VLM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Tiny model + 48 train / 8 test shape images (JSONL and parquet)."""
    from ds_vlm.demo import build_data_dir, build_model_dir

    out = tmp_path_factory.mktemp("demo")
    build_model_dir(out / "model")
    build_data_dir(out / "data", n_train=48, n_test=8)
    return out


@pytest.fixture(scope="session")
def family_models(demo_dir, tmp_path_factory):
    """family -> its tiny checkpoint, built on first use by the demo's command line (qwen3_vl: the demo's)."""
    from ds_vlm.demo import main

    built = {"qwen3_vl": demo_dir / "model"}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(family)
            main(["--family", family, "--out", str(out), "--train_size", "2", "--test_size", "1"])
            built[family] = out / "model"
        return built[family]

    return get


def _text_only(record: dict) -> dict:
    answer = record["conversations"][1]["value"]
    return {"conversations": [{"from": "human", "value": "Say the caption."}, {"from": "gpt", "value": answer}],
            "images": []}


@pytest.fixture(scope="session")
def mixed_data(demo_dir) -> Path:
    """Every other record is text-only, so ranks see image and text-only micro-batches side by side.
    Written as mixed.jsonl and mixed.parquet (images embedded); returns the JSONL path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = demo_dir / "data"
    with open(data / "train.jsonl") as f, open(data / "mixed.jsonl", "w") as g:
        for i, line in enumerate(f):
            record = json.loads(line)
            g.write(json.dumps(_text_only(record) if i % 2 else record) + "\n")
    rows = pq.read_table(data / "train.parquet").to_pylist()
    rows = [{**_text_only(r), "images": []} if i % 2 else r for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(rows), data / "mixed.parquet")
    return data / "mixed.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(args: list[str], nprocs: int = 2, launcher: str = "ranks") -> list[str]:
    """N local ranks of launch/train.py: by the DeepSpeed launcher (`deepspeed`, as users run it), or with its
    environment by tests/scripts/ranks.py (`ranks`: the same ranks without the launcher's ~5 s start-up)."""
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
                "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"), *args]
    return [sys.executable, str(ROOT / "tests" / "scripts" / "ranks.py"), str(nprocs), str(free_port()),
            str(ROOT / "launch" / "train.py"), *args]


def train_env(extra_env: dict | None = None) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(extra_env or {}))


def run_train(args: list[str], nprocs: int = 2, timeout: int = 300, extra_env: dict | None = None,
              launcher: str = "ranks", **popen):
    """`deepspeed --num_gpus N launch/train.py ARGS` on CPU ranks (see train_command); the CompletedProcess."""
    return subprocess.run(train_command(args, nprocs, launcher), cwd=ROOT, env=train_env(extra_env), capture_output=True,
                          text=True, timeout=timeout, **popen)


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r and "step" in r and "event" not in r]


def full_logits_loss_sum(logits, labels):
    """The reference loss: next-token cross-entropy summed over label tokens from every position's fp32 logits
    (what the trainer computed before it took logits at label rows only)."""
    import torch

    shifted = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path
