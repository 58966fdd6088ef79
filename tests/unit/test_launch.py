"""The launch recipes without a run: their command lines parse and name existing files, incomplete multi-node settings
are refused, the Pokemon preparation offline."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.encoding import check
from fixtures.runs import ROOT, launch_env

RECIPE = ROOT / "launch" / "run_qwen3_vl_2b.sh"
QWEN3_5 = ROOT / "launch" / "run_qwen3_5.sh"  # the same recipe on Qwen3.5: its own model, yaml and ZeRO-3
DEFAULT_MODEL = {RECIPE: "Qwen/Qwen3-VL-2B-Instruct", QWEN3_5: "Qwen/Qwen3.5-9B"}


MULTINODE = ROOT / "launch" / "run_multinode.sh"


def _dry_run(script: Path, *args: str, **env) -> list[list[str]]:
    proc = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=launch_env(DRY_RUN=1, **env), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _split_launch(cmd: list[str]) -> tuple[list[str], list[str]]:
    """A printed `deepspeed ... launch/train.py FLAGS` -> (launcher arguments, trainer flags)."""
    assert cmd[0] == "deepspeed", cmd
    at = cmd.index("launch/train.py")
    return cmd[1:at], cmd[at + 1:]


RECIPE_CASES = {
    "default": ([], {}, 2, {"num_gpus": 8, "master_port": 29500, "no_ssh": False}),
    "zero3 word, SP=2": (["zero3"], {"SP": "2"}, 3, {"num_gpus": 8}),
    "env overrides": (["--epochs", "1"], {"ZERO": "3", "NUM_GPUS": "4", "MODEL": "/models/qwen3-vl-2b",
                                          "OUT": "runs/x", "MASTER_PORT": "29555"}, 3,
                      {"num_gpus": 4, "master_port": 29555}),
    "ssh hostfile": ([], {"HOSTFILE": "launch/hostfile.example"}, 2,
                     {"hostfile": "launch/hostfile.example", "no_ssh": False, "num_gpus": -1}),
    "no_ssh node": ([], {"NODE_RANK": "1", "NNODES": "2", "MASTER_ADDR": "10.0.0.1", "INCLUDE": "node0@node1"}, 2,
                    {"no_ssh": True, "node_rank": 1, "master_addr": "10.0.0.1", "include": "node0@node1"}),
    "qwen3_5 default": ([], {}, 3, {"num_gpus": 8, "master_port": 29500, "no_ssh": False}),
    "qwen3_5 zero2 word, SP=2": (["zero2"], {"SP": "2"}, 2, {"num_gpus": 8}),
    "qwen3_5 env overrides": (["--epochs", "1"], {"NUM_GPUS": "4", "MODEL": "/models/qwen3.5-2b", "OUT": "runs/x"}, 3,
                              {"num_gpus": 4}),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_command_lines_parse_and_name_existing_files(case, tmp_path, monkeypatch):
    from deepspeed.launcher.runner import fetch_hostfile
    from deepspeed.launcher.runner import parse_args as parse_launcher_args

    from ds_vlm.flags import load_config

    args, env, stage, expected = RECIPE_CASES[case]
    script = QWEN3_5 if case.startswith("qwen3_5") else RECIPE
    commands = _dry_run(script, *args, TMPDIR=tmp_path, **env)  # TMPDIR: where a --no_ssh hostfile is written
    prepare = [c for c in commands if "launch/prepare_pokemon.py" in c]
    assert prepare and (ROOT / "launch" / "prepare_pokemon.py").is_file()  # data/pokemon is not in the repo
    launcher_args, flags = _split_launch([c for c in commands if "launch/train.py" in c][-1])

    launcher = parse_launcher_args(launcher_args + ["launch/train.py"])
    assert {key: getattr(launcher, key) for key in expected} == expected
    if "--hostfile" in launcher_args:
        hosts = fetch_hostfile(str(ROOT / launcher.hostfile))  # an absolute path stays as it is
        assert hosts and all(slots >= 1 for slots in hosts.values())
        if env.get("NNODES"):
            assert list(hosts.values()) == [8, 8]

    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository
    config = load_config(flags)
    keys = config.to_keys()
    assert (ROOT / keys["deepspeed"]).is_file() and (ROOT / flags[flags.index("--config") + 1]).is_file()
    assert json.loads((ROOT / keys["deepspeed"]).read_text())["zero_optimization"]["stage"] == stage
    assert keys["model"] == env.get("MODEL", DEFAULT_MODEL[script])
    assert flags[flags.index("--config") + 1] == ("launch/configs/qwen3_5_pokemon.yaml" if script == QWEN3_5 else
                                                  "launch/configs/qwen3_vl_2b_pokemon.yaml")
    # the seed recipe's settings
    assert keys["lr"] == 2e-5 and keys["grad_clip"] == 1.0 and keys["warmup_ratio"] > 0 and keys["min_lr_ratio"] == 0.1
    assert keys["weight_decay"] == 0.1 and (keys["adam_beta1"], keys["adam_beta2"]) == (0.9, 0.95)
    assert keys["packing"] and keys["max_tokens_per_batch"] >= keys["max_length"]
    assert keys["gradient_checkpointing"] and keys["train_vision"] == "all" and keys["train_llm"]
    assert keys["train_data"].endswith("train.jsonl") and keys["eval_data"].endswith("test.jsonl")
    assert keys["sequence_parallel"] == int(env.get("SP", 1))
    if case.endswith("env overrides"):
        assert keys["epochs"] == 1 and keys["output_dir"] == "runs/x"


def test_multinode_script_refuses_incomplete_settings():
    for env in ({"NODE_RANK": "0"}, {"NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"}, {"HOSTFILE": "/nonexistent"}):
        proc = subprocess.run(["bash", str(MULTINODE), "--model", "m"], cwd=ROOT, env=launch_env(DRY_RUN=1, **env),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "run_multinode.sh:" in proc.stderr, (env, proc.stderr)
    proc = subprocess.run(["bash", str(RECIPE)], cwd=ROOT, env=launch_env(DRY_RUN=1, ZERO="9"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ZERO=9" in proc.stderr


def test_docs_launch_commands_name_existing_files():
    """Every script, json and yaml the README and docs/multinode.md name exists; the multi-node page covers
    the launcher flags and network variables."""
    section = (ROOT / "docs" / "multinode.md").read_text()
    text = section + (ROOT / "README.md").read_text()
    paths = set(re.findall(r"(?:launch|ds_configs)/[\w./-]+\.(?:sh|py|json|yaml|example)", text))
    assert {"launch/run_qwen3_vl_2b.sh", "launch/run_multinode.sh", "launch/hostfile.example"} <= paths
    assert [p for p in paths if not (ROOT / p).is_file()] == []
    for word in ("--no_ssh", "--node_rank", "--master_addr", "--master_port", "--include", "--exclude",
                 "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME"):
        assert word in section, word


def _fake_pokemon(demo_dir: Path, tmp_path: Path, n: int = 12) -> tuple[Path, Path]:
    """The hub dataset's layout, offline: a save_to_disk folder (conversations + PIL images) and a parquet
    file in the `messages` layout with {bytes, path} images and no <image> placeholder."""
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(demo_dir / "data" / "train.parquet").to_pylist()[:n]
    images = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"conversations": [r["conversations"] for r in rows], "images": images}
                               ).save_to_disk(str(saved))
    messages = [{"messages": [{"role": "user", "content": "Describe the picture."},
                              {"role": "assistant", "content": r["conversations"][1]["value"]}],
                 "images": [{"bytes": r["images"][0]["bytes"], "path": None}]} for r in rows]
    parquet = tmp_path / "messages.parquet"
    pq.write_table(pa.Table.from_pylist(messages), parquet)
    return saved, parquet


def _prepare(source: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_pokemon.py"), "--source", str(source),
                           "--out", str(out), *args], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_prepare_pokemon_offline_writes_data_the_trainer_reads(demo_dir, tmp_path):
    from transformers import AutoProcessor

    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for

    saved, parquet = _fake_pokemon(demo_dir, tmp_path)
    _prepare(saved, tmp_path / "a", "--test_size", "3", "--seed", "1")
    _prepare(saved, tmp_path / "b", "--test_size", "0.25", "--seed", "1")   # same split: 3 of 12
    _prepare(parquet, tmp_path / "c", "--test_size", "3", "--seed", "2")
    split = {}
    for name in "abc":
        out = tmp_path / name
        train, test = [[json.loads(line) for line in open(out / f"{s}.jsonl")] for s in ("train", "test")]
        assert (len(train), len(test)) == (9, 3), name
        for record in train + test:
            assert record["conversations"][0]["from"] == "human" and record["conversations"][1]["from"] == "gpt"
            assert record["conversations"][0]["value"].count("<image>") == len(record["images"]) == 1
            assert not os.path.isabs(record["images"][0]) and (out / record["images"][0]).is_file()
        split[name] = sorted(r["conversations"][1]["value"] + r["images"][0] for r in test)
    assert split["a"] == split["b"] != split["c"]
    # the same record's bytes are kept as they were (no re-encoding of the parquet images)
    assert (tmp_path / "c" / "images" / "000000_0.png").read_bytes() == (tmp_path / "a" / "images" /
                                                                          "000000_0.png").read_bytes()

    encoder = Encoder(AutoProcessor.from_pretrained(demo_dir / "model"), adapter_for("qwen3_vl"), max_length=256)
    for name in "ac":
        records = RecordIndex(f"{tmp_path / name / 'train.jsonl'},{tmp_path / name / 'test.jsonl'}")
        kinds = [c.kind for c in check(records, encoder)]
        assert kinds == ["ok"] * 12, kinds
