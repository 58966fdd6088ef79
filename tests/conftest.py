"""Shared fixtures: a tiny offline Qwen3-VL, small datasets, and a runner for real multi-rank runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marker
def pytest_collection_modifyitems(config, items):
    """Every test under tests/dist/ launches real multi-process runs: marked `dist` (`-m "not dist"` is the fast,
    in-process tier under tests/unit/). Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject's addopts) the
    multi-rank tests that compute run one after another on one worker (xdist group `ranks`: two of them at once
    would share two cores and both slow down), while the other worker runs the in-process tier and the tests
    marked `waits` (most of their time is spent waiting on a timeout, a stopped rank or a node that never
    comes)."""
    for item in items:
        if "dist" in Path(str(item.fspath)).relative_to(ROOT / "tests").parts[:1]:
            item.add_marker(pytest.mark.dist)
            if item.get_closest_marker("waits") is None:
                item.add_marker(pytest.mark.xdist_group("ranks"))


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The data cache of every test (and of the runs they start): a session folder, never ~/.cache."""
    path = tmp_path_factory.mktemp("data_cache")
    os.environ["DS_VLM_CACHE"] = str(path)
    return path


_ZYGOTE: dict = {}


def start_zygote() -> None:
    """The session's zygote (tests/scripts/zygote.py), started on the first run that tests/scripts/ranks.py
    starts: it imports what a rank imports once, in the background, and then forks the ranks (runs started
    before it is ready start their ranks as new processes). Stopped at the end of the session."""
    if _ZYGOTE:
        return
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ds_vlm_zygote_")) / "socket"  # short: a socket path has ~100 characters
    _ZYGOTE["proc"] = subprocess.Popen([sys.executable, "-u", str(ROOT / "tests" / "scripts" / "zygote.py"),
                                        str(path)], cwd=ROOT, env=train_env(), stdin=subprocess.DEVNULL)
    _ZYGOTE["path"] = path
    os.environ["DS_VLM_TEST_ZYGOTE"] = str(path)


@pytest.fixture(scope="session", autouse=True)
def zygote():
    yield
    if _ZYGOTE:
        os.environ.pop("DS_VLM_TEST_ZYGOTE", None)
        proc = _ZYGOTE["proc"]
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        import shutil

        shutil.rmtree(_ZYGOTE["path"].parent, ignore_errors=True)


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
    start_zygote()
    return [sys.executable, str(ROOT / "tests" / "scripts" / "ranks.py"), str(nprocs), str(free_port()),
            str(ROOT / "launch" / "train.py"), *args]


def train_env(extra_env: dict | None = None) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(extra_env or {}))


def run_train(args: list[str], nprocs: int = 2, timeout: int = 300, extra_env: dict | None = None,
              launcher: str = "ranks", **popen):
    """`deepspeed --num_gpus N launch/train.py ARGS` on CPU ranks (see train_command); the CompletedProcess."""
    return subprocess.run(train_command(args, nprocs, launcher), cwd=ROOT, env=train_env(extra_env),
                          capture_output=True,
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


def write_bad_set(tmp: Path, demo_dir: Path) -> Path:
    good = json.loads((demo_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    image = str(demo_dir / "data" / good["images"][0])
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    records = [
        {**good, "images": [image], "id": "r0"},                       # 0 ok (an id nothing reads)
        {**good, "images": [str(tmp / "nope.png")]},                   # 1 missing image
        {**good, "images": [str(tmp / "broken.png")]},                 # 2 unreadable image
        {**good, "images": [image, image]},                            # 3 one <image>, two images
        {"conversations": good["conversations"][:1], "images": [image]},  # 4 no assistant turn
        {**good, "images": [image]},                                   # 5 ok
    ]
    path = tmp / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def launch_and_kill_after(args: list[str], step: int, timeout: float = 240) -> None:
    """Start a 2-rank run and kill -9 its whole process group once `step` is logged."""
    out = Path(args[args.index("--output_dir") + 1])
    proc = subprocess.Popen(train_command(args), cwd=ROOT, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in read_metrics(out)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def loss_and_grads(model, micro):
    """The summed loss of a MicroBatch and every parameter's gradient (on sdpa, a packed row's block-diagonal
    mask comes from its position ids); and the MicroBatch."""

    from ds_vlm.loss import LabelLoss, LabelRows

    model.zero_grad()
    loss = LabelLoss(model).loss_of(model, micro.inputs, LabelRows.from_labels(micro.labels))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, micro


def load_4bit(model_dir: Path, config):
    """The model of `model_dir` as QLoRA loads it on the CPU (`config`: a ModelConfig with --lora_bits 4): the
    language tower's linear layers in bitsandbytes' 4-bit NF4, fp32 elsewhere."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ds_vlm.model_loading import quantization_config
    from ds_vlm.models import adapter_for

    hf_config = AutoConfig.from_pretrained(model_dir)
    quantization = quantization_config(config, adapter_for(hf_config.model_type), torch.float32, False, hf_config)
    return AutoModelForImageTextToText.from_pretrained(model_dir, device_map={"": "cpu"}, dtype=torch.float32,
                                                       quantization_config=quantization)


def assert_same(a, b):
    """Two (loss, gradients) equal to fp32 rounding, each gradient relative to its own scale."""
    import torch

    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    largest = max(float(g.abs().max()) for g in b[1].values())
    assert a[1].keys() == b[1].keys()
    for name, grad in b[1].items():  # relative to each gradient's scale (see unit/test_loss.py)
        scale = max(float(grad.abs().max()), 1e-3 * largest)
        torch.testing.assert_close(a[1][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.fixture(scope="module")
def packing_records(demo_dir, tmp_path_factory) -> Path:
    """An image record, a text-only one, a two-image one, another image record (same length as the first)."""
    data = demo_dir / "data"
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:3]]
    images = [str(data / r["images"][0]) for r in rows]
    answer = rows[0]["conversations"][1]["value"]
    out = tmp_path_factory.mktemp("packing") / "records.jsonl"
    records = [
        {"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                           {"from": "gpt", "value": answer}], "images": [images[0]]},
        {"conversations": [{"from": "human", "value": "Say a caption."}, {"from": "gpt", "value": answer}]},
        {"conversations": [{"from": "human", "value": "<image> and <image>: what is in these pictures?"},
                           {"from": "gpt", "value": f"{answer} {rows[1]['conversations'][1]['value']}"}],
         "images": [images[1], images[2]]},
        {"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                           {"from": "gpt", "value": answer}], "images": [images[1]]},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def packing_setup(model_dir: Path, data: Path):
    """(model in train mode, its dataset of `data`, a padding collator, a packing collator)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.data.batching import Collator, SFTDataset
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.config.get_text_config().use_cache = False  # as load_model does: a cache disables packing's mask
    model.train()
    adapter = adapter_for(model.config.model_type)
    encoder = Encoder(AutoProcessor.from_pretrained(model_dir), adapter, 4096)
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    padded = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())
    packed = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), adapter.position_ids(model.config),
                       packing=True)
    return model, dataset, padded, packed


def check(records, encoder, indices=None):
    """Preflight's check of `records` (a RecordIndex; all of them, or the global `indices`), in this process."""
    import numpy as np

    from ds_vlm.data.preflight import check_columns

    return check_columns(records, encoder, np.arange(len(records)) if indices is None else np.asarray(indices))


@pytest.fixture(scope="session")
def all_formats(demo_dir, tmp_path_factory) -> list[Path]:
    """The demo records in every supported layout and container, 8 records each (unit/data/test_sources.py
    reads them, dist/test_train.py trains on each)."""
    import base64

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("formats")
    data = demo_dir / "data"
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:8]]
    images = [str(data / r["images"][0]) for r in rows]
    answers = [r["conversations"][1]["value"] for r in rows]

    def write_jsonl(name, records):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return out / name

    llava = [{"image": im, "conversations": [{"from": "human", "value": "<image>\nWhat is in this picture?"},
                                             {"from": "gpt", "value": a}]} for im, a in zip(images, answers)]
    (out / "llava.json").write_text(json.dumps(llava))
    messages = write_jsonl("messages.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>What is in this picture?"},
                      {"role": "assistant", "content": a}], "images": [im]} for im, a in zip(images, answers)])
    openai = write_jsonl("openai.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": im},
                                                   {"type": "text", "text": "What is in this picture?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": a}]}]}
        for im, a in zip(images, answers)] + [
        {"messages": [{"role": "user", "content": "Say a caption."}, {"role": "assistant", "content": answers[0]}]}])
    table = pq.read_table(data / "train.parquet").slice(0, 8)
    (out / "parquet_dir" / "part").mkdir(parents=True)
    pq.write_table(table.slice(0, 4), out / "parquet_dir" / "part" / "a.parquet")
    pq.write_table(table.slice(4, 4), out / "parquet_dir" / "b.parquet")
    saved = datasets.Dataset(pa.Table.from_pylist(
        [{**r, "images": [{"bytes": Path(im).read_bytes(), "path": None}]} for r, im in zip(rows, images)]))
    saved.save_to_disk(str(out / "saved"))
    swift = write_jsonl("swift.jsonl", [
        {"system": "Be brief.", "query": "<image>What is in this picture?", "response": a, "images": [im]}
        for im, a in zip(images, answers)])
    (out / "alpaca.json").write_text(json.dumps([
        {"instruction": "<image>What is in this picture?", "input": "", "output": a, "images": [im]}
        for im, a in zip(images, answers)]))
    # LLaMA-Factory's newer typed parts, a base64 image, and two records that must not train: audio, a web URL
    url = "data:image/png;base64," + base64.b64encode(Path(images[0]).read_bytes()).decode()
    mixed = write_jsonl("mixed_peers.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "value": images[1]},
                                                   {"type": "text", "value": "What is in this picture?"}]},
                      {"role": "assistant", "content": [{"type": "text", "value": answers[1]}]}]},
        {"messages": [{"role": "user", "content": "<audio>What is said?"}, {"role": "assistant", "content": "Hi."}],
         "audios": ["speech.wav"]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "What is in this picture?"}]},
                      {"role": "assistant", "content": answers[0]}]},
        {"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                           {"from": "gpt", "value": answers[2]}], "images": ["http://example.com/a.png"]},
    ])
    return [data / "train.jsonl", out / "llava.json", messages, openai, out / "parquet_dir", out / "saved", swift,
            out / "alpaca.json", mixed]


@pytest.fixture
def data(demo_dir, tmp_path) -> Path:
    """The demo's train records in two JSONL files (24 each), next to its images."""
    import shutil

    shutil.copytree(demo_dir / "data" / "images", tmp_path / "images")
    lines = (demo_dir / "data" / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:24]))
    (tmp_path / "b.jsonl").write_text("".join(lines[24:]))
    return tmp_path


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Path:
    """The demo's clips (8 frames at 4 fps: 2 s), 6 for training, 2 held out."""
    from ds_vlm.demo import build_video_data

    return build_video_data(tmp_path_factory.mktemp("video"), n_train=6, n_test=2)


def absolute_rows(path: Path, root: Path) -> list[dict]:
    """Records with absolute media paths, so that they can be mixed into one file anywhere."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        for key in ("images", "videos"):
            if key in row:
                row[key] = [str(root / p) for p in row[key]]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def video_encoder(model_dir: Path, family: str, sampling=None, max_length: int = 4096, truncation: str = "error"):
    """The Encoder of `family` with `sampling` (default VideoSampling())."""
    from transformers import AutoProcessor

    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.videos import VideoSampling
    from ds_vlm.models import adapter_for

    return Encoder(AutoProcessor.from_pretrained(model_dir), adapter_for(family), max_length, truncation,
                   sampling or VideoSampling())


RUNNER = [sys.executable, "-m", "deepspeed.launcher.runner"]  # what the `deepspeed` script runs
LAUNCH_VARS = ("HOSTFILE", "NODE_RANK", "NNODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "INCLUDE", "EXCLUDE",
               "ZERO", "NUM_GPUS", "MODEL", "DATA", "OUT", "CONFIG", "DRY_RUN", "DEEPSPEED")


def launch_env(**extra) -> dict:
    """The launch scripts' environment: this venv's `deepspeed` on PATH, one thread per CPU rank, and none of
    the caller's launch or SLURM variables."""
    import shlex

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    bindir = Path(sys.executable).parent
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")
    if not (bindir / "deepspeed").exists():
        env["DEEPSPEED"] = shlex.join(RUNNER)
    env.update({k: str(v) for k, v in extra.items()})
    return env
