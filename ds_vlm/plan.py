"""Know before you launch: each GPU's peak memory and the step time of a run, from the model's config alone.

    python -m ds_vlm.plan --model Qwen/Qwen3-VL-2B-Instruct --deepspeed ds_configs/zero3.json --world_size 8 \\
        --gpu h100-80gb [--train_data D] [--max_tokens_per_batch 65536 --packing] [--out plan.json]

The trainer's own flags and --config (same parser, same validation), plus --world_size (all ranks over all
nodes), --gpu NAME (GPUS below) or --gpu_memory_gb G, --mfu (the step time's assumption), --out.

How (execute, don't guess):
- Model states from DeepSpeed's partitioning over the data-parallel ranks (`model_states`): the weights in
  the run's precision (1/N of them under ZeRO-3), gradients (bf16 ones while they are reduced; ZeRO-2/3
  keep 1/N in fp32), the optimizer's fp32 master copy and AdamW's two moments (1/N from ZeRO-1 on; none on
  the GPU with `offload_optimizer`), ZeRO's reduce bucket and, under ZeRO-3, the gathered live parameters
  (`stage3_max_live_parameters`, `stage3_prefetch_bucket_size`). Which parameters train (frozen vision
  tower, LoRA adapters) is read from the real model built on the meta device with the trainer's own
  `set_trainable` and `apply_lora`.
- Activations by running the real model's forward and backward on one worst-case micro-batch under
  PyTorch's FakeTensorMode (shapes only: no weights, no GPU), every storage it creates followed from
  creation to release (`LiveBytes`, a dispatch mode; the gradients left out): the trainer's label-row loss,
  activation checkpointing and packing positions, attention as
  the kernel the target runs (on a GPU: no L x L matrix; on a CPU, what the CPU run uses). The worst
  micro-batch: from this data's preflight counts with --train_data (the longest sample, the most image
  tokens), else --max_tokens_per_batch or --max_length filled with one image of the processor's largest size.
- The largest token budget that fits: activations are traced at two budgets and interpolated (they grow
  linearly in tokens with checkpointing and a varlen/flash kernel).

Printed: each part per rank, the total against the GPU (with an allocator margin), the largest budget that
fits, the step's FLOPs (the trainer's FlopsCounter) and its time and tokens/s at the stated MFU, and when it
does not fit, what would. `--out` writes it all; `peak_gb_per_rank` and `max_tokens_per_batch_that_fits`
keep their names.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

GIB = 1 << 30
_MISSING = object()
# name: (memory as torch reports it, dense bf16 peak TFLOP/s: the table metrics.py's MFU uses)
GPUS = {"h100-80gb": (80 * GIB, 989.0), "h200": (140 * GIB, 989.0), "h800": (80 * GIB, 989.0),
        "a100-80gb": (80 * GIB, 312.0), "a100-40gb": (40 * GIB, 312.0), "a800-80gb": (80 * GIB, 312.0),
        "l40s": (48 * GIB, 362.0), "l40": (48 * GIB, 181.0), "a6000": (48 * GIB, 155.0), "a10g": (24 * GIB, 125.0),
        "l4": (24 * GIB, 121.0), "4090": (24 * GIB, 165.0), "v100-32gb": (32 * GIB, 125.0)}
DEFAULT_MFU = 0.35  # an assumption, stated in the output: a dense 2B-8B fine-tune on H100s reaches 30-45%
MARGIN = 0.10       # the allocator's fragmentation and CUDA context, as a share of the GPU


@dataclass
class ModelStates:
    weights: float
    gradients: float
    optimizer: float
    buckets: float
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buckets


def model_states(n_params: int, n_trained: int, stage: int, world: int, bytes_per_param: int,
                 zero: Optional[dict] = None, largest_module: int = 0) -> ModelStates:
    """Per-rank bytes of weights, gradients, optimizer states and ZeRO's buffers (see the module docstring).
    `bytes_per_param`: 2 in bf16, 4 in fp32; `largest_module`: the most parameters one module holds directly
    (what ZeRO-3 gathers at a time)."""
    zero = zero or {}
    p, t = bytes_per_param, n_trained
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    shard = world if stage >= 1 else 1
    master = 4 * t if (p == 2 or stage >= 1) else 0  # a separate fp32 copy (ZeRO 1-3 keep one in fp32 too)
    optimizer = 0.0 if offload_optimizer else (master + 8 * t) / shard
    if stage == 3:
        weights = 0.0 if offload_param else n_params * p / world
        live = int(zero.get("stage3_max_live_parameters", 1e9)) + int(zero.get("stage3_prefetch_bucket_size", 5e7))
        block = largest_module or n_params
        # gathered in full while a module runs: that module and the one prefetched behind it, within the caps
        weights += min(n_params, 2 * block, live) * p * (world - 1) / world if world > 1 else 0
    else:
        weights = n_params * p
    if stage >= 2:
        gradients = (4 * t / world) + (0 if stage == 2 else t * p / world)
    else:
        gradients = t * p + (4 * t / shard if stage == 1 else 0)
    bucket = min(t, int(zero.get("reduce_bucket_size", 5e8))) * p if stage >= 1 and world > 1 else 0
    return ModelStates(weights, gradients, optimizer, bucket,
                       {"offload_optimizer": offload_optimizer, "offload_param": offload_param, "sharded_over": shard})


@dataclass
class Activations:
    tokens: int           # tokens of the traced micro-batch
    image_tokens: int
    peak: float           # activations and temporaries at the traced step's peak, bytes
    head: float = 0.0     # of which the loss's chunk (its bound)


def count_parameters(config, adapter, model_config) -> tuple[int, int, object]:
    """(all parameters, trained ones, the meta-device model) under the run's trainable flags and LoRA."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .lora import apply_lora
    from .model_loading import set_trainable

    with torch.device("meta"), _no_zero3_init():
        model = AutoModelForImageTextToText.from_config(copy.deepcopy(config))
    set_trainable(model, adapter, model_config)
    if model_config.lora_rank:
        model, _ = apply_lora(model, adapter, model_config)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), model


def largest_module(model) -> int:
    """The most parameters a single module holds itself (ZeRO-3 gathers module by module)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def worst_sample(encoder, n_tokens: int, n_image_tokens: int) -> dict:
    """A sample of about `n_tokens` tokens holding one image of about `n_image_tokens` tokens (the processor's
    own encoding of a blank image of that size, the rest an answer of filler words)."""
    from PIL import Image

    from .data.formats import Sample

    processor = encoder.processor.image_processor
    side = 64
    if n_image_tokens:
        patch = getattr(processor, "patch_size", 14) * getattr(processor, "merge_size", 1)
        side = max(patch, int(math.sqrt(n_image_tokens)) * patch)
    image = Image.new("RGB", (side, side), (127, 127, 127))
    words = max(1, n_tokens // 2)
    limit, encoder.max_length = encoder.max_length, 1 << 30  # the search may overshoot on the way
    try:
        return _fill(encoder, image, words, n_tokens, Sample)
    finally:
        encoder.max_length = limit


def _fill(encoder, image, words: int, n_tokens: int, Sample) -> dict:
    for _ in range(4):  # two refinements of the filler length are enough: tokens are linear in words
        prompt = [{"type": "image"}, {"type": "text", "text": "Describe."}]
        sample = Sample(messages=[{"role": "user", "content": prompt, "learn": False},
                                  {"role": "assistant", "content": [{"type": "text", "text": " ".join(["ok"] * words)}],
                                   "learn": True}], source="plan", index=0)
        encoded = encoder.encode(sample, [image])
        have = encoded["input_ids"].shape[1]
        if abs(have - n_tokens) <= max(8, n_tokens // 100):
            break
        per_word = max(1e-3, (have - (encoded["input_ids"] == encoder.image_token_id).sum().item()) / max(1, words))
        words = max(1, words + int((n_tokens - have) / per_word))
    return encoded


KNOWN_NUMEL = 1 << 22  # host-side values followed through the trace up to this size (index tensors)


class LiveBytes:
    """Every tensor storage created while active (a TorchDispatchMode above `fake_mode`), with when it was
    created and freed: the peak of what was alive, leaving out chosen storages (the parameters' gradients,
    counted with the model states).

    Fake tensors hold no values, so an op whose output shape depends on values (`repeat_interleave` over the
    image grid, `nonzero`) cannot run on them. Values that come from the host (the micro-batch's real tensors:
    image grids, positions, lengths) are followed: an op whose tensor inputs all have known values and are
    small runs on the real values too, and its fake output remembers them. The model's parameters and
    activations are never known, so everything that costs memory runs on fake tensors."""

    def __init__(self, fake_mode):
        import weakref

        import torch
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
            FakeTensor,
            unset_fake_temporarily,
        )
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
        from torch.utils.weak import WeakIdKeyDictionary

        self.events: list[tuple[int, int]] = []  # (+bytes or -bytes, storage key), in order
        known = WeakIdKeyDictionary()  # fake tensor -> its real value
        views = WeakIdKeyDictionary()   # fakes standing for views of real inputs (they allocate nothing)
        tracker = self

        index_ops = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}

        def as_positions(indices) -> list:
            """Known boolean masks among `indices` as the positions they select, one long tensor per masked
            dimension (what `x[mask]` needs values for)."""
            out = []
            for index in indices:
                real = real_of(index) if index is not None else _MISSING
                if real is _MISSING or real.dtype != torch.bool:
                    out.append(index)
                    continue
                with unset_fake_temporarily():
                    positions = real.nonzero(as_tuple=True)
                for p in positions:
                    fake = fake_mode.from_tensor(p)
                    known[fake] = p
                    out.append(fake)
            return out

        def small(tensor) -> bool:
            limit = KNOWN_NUMEL if tensor.is_floating_point() else 64 * KNOWN_NUMEL
            return tensor.numel() <= limit

        def real_of(value):
            if isinstance(value, FakeTensor):
                return known.get(value, _MISSING)
            return value

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                flat, spec = tree_flatten((args, kwargs))
                tensors = [v for v in flat if isinstance(v, torch.Tensor)]
                reals = [real_of(v) for v in flat]
                out = None
                if all(r is not _MISSING for r in reals) and all(small(t) for t in tensors):
                    try:  # the shapes first (cheap); values too when the outputs are small
                        out = func(*args, **kwargs)
                        follow = all(small(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
                    except (DynamicOutputShapeException, DataDependentOutputException):  # nonzero, .item(): values
                        follow = True
                    if follow:
                        with unset_fake_temporarily():
                            real_args, real_kwargs = tree_unflatten(reals, spec)
                            real_out = func(*real_args, **real_kwargs)
                            inputs = {r.untyped_storage().data_ptr() for r in reals if isinstance(r, torch.Tensor)}
                        out = tree_map(lambda r: fake_mode.from_tensor(r) if isinstance(r, torch.Tensor) else r,
                                       real_out)
                        for fake, real in zip(tree_leaves(out), tree_leaves(real_out)):
                            if isinstance(fake, torch.Tensor):
                                known[fake] = real
                                if real.untyped_storage().data_ptr() in inputs:  # a view: no new memory
                                    views[fake] = True
                if out is None:
                    if func in index_ops and len(args) > 1 and isinstance(args[1], (list, tuple)):
                        args = (args[0], as_positions(args[1]), *args[2:])
                    out = func(*args, **kwargs)
                # a view of an input allocates nothing: of a storage followed already it is one more tensor on it;
                # of one that was there before the trace (parameters, the batch) it is not new memory at all
                before = {t.untyped_storage()._cdata for t in tensors
                          if t.untyped_storage()._cdata not in tracker._refs}
                for tensor in tree_leaves(out):
                    if (isinstance(tensor, torch.Tensor) and tensor not in views
                            and tensor.untyped_storage()._cdata not in before):
                        tracker._add(tensor, weakref)
                return out

        self.mode = _Mode()
        self._refs: dict[int, int] = {}    # storage key -> tensors alive on it
        self._serial: dict[int, int] = {}  # storage key -> the serial number of its current lifetime

    def _add(self, tensor, weakref) -> None:
        """A storage lives while any tensor on it does (tensors keep their Python objects while alive; a
        storage's Python wrapper does not, so it cannot be followed itself)."""
        storage = tensor.untyped_storage()
        key = storage._cdata  # an address: reused once freed, so each lifetime gets its own serial number
        if key not in self._refs:
            self._refs[key] = 0
            self._serial[key] = len(self.events)
            self.events.append((int(storage.nbytes()), self._serial[key]))
        self._refs[key] += 1
        weakref.finalize(tensor, self._release, key, self._serial[key], int(storage.nbytes()))

    def _release(self, key: int, serial: int, size: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key], self._serial[key]
            self.events.append((-size, serial))

    def serials(self, tensors) -> set[int]:
        """The serial numbers of the storages under `tensors` (alive now)."""
        return {self._serial[t.untyped_storage()._cdata] for t in tensors
                if t.untyped_storage()._cdata in self._serial}

    def peak(self, leave_out: set[int] = frozenset()) -> int:
        live = best = 0
        for size, key in self.events:
            if key not in leave_out:
                live += size
                best = max(best, live)
        return best


@contextmanager
def _no_zero3_init():
    """A ZeRO-3 run's HfDeepSpeedConfig makes transformers build every model under deepspeed.zero.Init (which
    partitions with collectives): the planner's shape-only copies must be built plainly."""
    from transformers.integrations import deepspeed as hf_deepspeed

    with _patched(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None):
        yield


@contextmanager
def _patched(module, name: str, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def trace_activations(model_dir: str, config, model_config, adapter, attention: str, micro,
                      dtype) -> Activations:
    """The activation and temporary peak of one micro-batch's forward and backward, on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForImageTextToText

    from .forward import ForwardContext
    from .loss import LabelLoss, LabelRows
    from .model_loading import enable_checkpointing, set_trainable

    rows = LabelRows.from_labels(micro.labels)  # host-side inputs from real tensors first
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # built on the meta device (peft's adapters too: its dtype moves cannot swap fake parameters), then given
    # fake storages
    config = copy.deepcopy(config)  # from_config writes the attention choice into the config it is given
    with torch.device("meta"), _no_zero3_init():
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=attention, dtype=dtype)
    adapter.prepare(model)
    getattr(model.config, "text_config", model.config).use_cache = False
    set_trainable(model, adapter, model_config)
    trained = model
    if model_config.lora_rank:
        from .lora import apply_lora

        trained, _ = apply_lora(model, adapter, model_config)  # peft changes `model` in place and wraps it
    with mode:
        trained.to_empty(device="cpu")
        enable_checkpointing(model, adapter, model_config)
        trained.train()
        context = ForwardContext(LabelLoss(model, model_config.loss), torch.device("cpu"), dtype)
        tracker = LiveBytes(mode)
        # transformers builds a full L x L causal mask when it sees fake tensors (it takes them for a compile
        # trace); the real run's sdpa gets is_causal and no mask. Host values are known here, so the trace
        # decides as the real run does.
        from transformers import masking_utils

        with tracker.mode, _patched(masking_utils, "is_tracing", lambda tensor=None: False):
            with context.armed(micro, rows) as forward:
                inputs = dict(forward.inputs)
                mask = micro.inputs.get("attention_mask")
                if mask is not None and bool(mask.all()):  # decided on the host, as the model decides on real
                    inputs.pop("attention_mask")            # tensors: no padding, no mask (causal kernels)
                output = trained(**inputs)
            loss = forward.loss(output)
            loss.backward()
        grads = tracker.serials(p.grad for p in model.parameters() if p.grad is not None)
        peak = tracker.peak(leave_out=grads)
    image_tokens = int((micro.inputs["input_ids"] == getattr(config, "image_token_id", -1)).sum())
    return Activations(tokens=int(micro.inputs["input_ids"].numel()), image_tokens=image_tokens, peak=float(peak))


PLAN_CACHE_VERSION = 1


def startup_line(config, loaded, ds_config: dict, world: int, checks, encoder) -> str:
    """The trainer's one-line plan at start (rank 0): model states from the loaded model's own parameters and
    DeepSpeed's partitioning, the activations of this data's worst micro-batch traced on fake tensors (cached
    in the data cache, keyed by the model config, the trainable flags, the batch and the worst sample's
    counts, so a restart pays nothing), against the GPU's memory. A run on a CPU states the peak only."""
    import hashlib
    from dataclasses import asdict

    import torch

    from .data.cache import cache_root, writable
    from .data.preflight import OK

    model, adapter = loaded.model, loaded.adapter
    zero = ds_config["zero_optimization"]
    stage, bf16 = zero.get("stage", 0), ds_config["bf16"]["enabled"]
    params = list(model.parameters())
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)  # ZeRO-3: the full sizes
    n_trained = sum(int(getattr(p, "ds_numel", p.numel())) for p in params if p.requires_grad)
    block = max((sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters(recurse=False))
                 for m in model.modules()), default=0)
    states = model_states(n_params, n_trained, stage, world, 2 if bf16 else 4, zero, block)
    ok = checks.kind == OK
    longest = int(checks.n_tokens[ok].max()) if ok.any() else config.data.max_length
    most_image = int(checks.n_image_tokens[ok].max()) if ok.any() else 0
    batch, sp = config.batch, config.parallel.sequence_parallel
    key = hashlib.sha256(json.dumps([PLAN_CACHE_VERSION, model.config.to_json_string(), asdict(config.model),
                                     batch.micro_batch_size, batch.max_tokens_per_batch, batch.packing, longest,
                                     most_image, sp, bf16], sort_keys=True, default=str).encode()).hexdigest()[:24]
    root = writable(cache_root(config.data.data_cache))
    path = root / "plan" / f"{key}.json" if root is not None else None
    if path is not None and path.exists():
        activations = json.loads(path.read_text())["activations"]
    else:
        from .data.batching import Collator

        positions = adapter.position_ids(model.config) if (batch.packing or adapter.padded_batch_positions) else None
        collator = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), positions, multiple_of=max(1, sp),
                            packing=batch.packing)
        sample = worst_sample(encoder, longest, most_image)
        copies = max(1, batch.max_tokens_per_batch // sample["input_ids"].shape[1]) if batch.max_tokens_per_batch \
            else batch.micro_batch_size
        micro = collator([dict(sample) for _ in range(copies)])
        activations = trace_activations(config.model.path, model.config, config.model, adapter, "sdpa", micro,
                                        torch.bfloat16 if bf16 else torch.float32).peak / max(1, sp)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"activations": activations}))
    peak = states.total + activations
    said = (f"plan: predicted peak {_bytes(peak)} a rank (model states {_bytes(states.total)}, activations "
            f"{_bytes(activations)} for a micro-batch of the longest sample, {longest} tokens)")
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        fits = peak + MARGIN * memory <= memory
        said += (f" of {memory / 1e9:.1f} GB: " + ("fits" if fits else "WILL NOT FIT: see `python -m ds_vlm.plan` "
                                                    "for what would (ZeRO-3, sequence parallelism, a smaller "
                                                    "--max_tokens_per_batch)"))
    else:
        said += "; on a CPU, no GPU memory to compare"
    return said


def main(argv=None) -> int:
    report = plan(argv)
    if report is None:
        return 2
    print(render(report))
    return 0 if report["fits"] else 1


def _extra(parser) -> None:
    parser.add_argument("--world_size", type=int, default=1, help="all ranks over all nodes")
    parser.add_argument("--gpu", default="h100-80gb", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--gpu_memory_gb", type=float, default=0.0, help="the GPU's memory (GB of 1e9 bytes), "
                                                                          "instead of --gpu's")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation the step time "
                                                                        "assumes")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="the machine planned for: cuda (bf16, flash/varlen attention) or cpu (fp32, sdpa)")
    parser.add_argument("--out", default="", help="write the plan as JSON here")


def plan(argv=None) -> Optional[dict]:
    import torch
    from transformers import AutoConfig, AutoProcessor

    from .config import ConfigError, load_tool_config
    from .data.batching import Collator
    from .data.encode import encoder_for
    from .ds_config import resolve_ds_config
    from .metrics import FlopsCounter
    from .models import adapter_for

    try:
        config, extra = load_tool_config(argv, _extra, needs_data=False)
        if not config.parallel.deepspeed:
            raise ConfigError("--deepspeed: the ZeRO json to plan for (ds_configs/zero2.json, ...)")
        if extra["gpu"] not in GPUS and not extra["gpu_memory_gb"]:
            raise ConfigError(f"--gpu {extra['gpu']!r}: one of {', '.join(GPUS)}, or give --gpu_memory_gb")
        ds = resolve_ds_config(config, extra["world_size"])
    except (ConfigError, ValueError, OSError) as err:
        print(f"ds-vlm plan: error: {err}", file=sys.stderr)
        return None
    began = time.perf_counter()
    world, sp = extra["world_size"], config.parallel.sequence_parallel
    model_cfg = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    adapter = adapter_for(model_cfg.model_type)
    processor = AutoProcessor.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    encoder = encoder_for(processor, adapter, config.data)
    cuda = extra["device"] == "cuda"
    precision = 2 if cuda and config.model.precision != "fp32" else 4
    dtype = torch.bfloat16 if precision == 2 else torch.float32
    zero = ds["zero_optimization"]
    stage = zero.get("stage", 0)
    n_params, n_trained, meta_model = count_parameters(model_cfg, adapter, config.model)
    block = largest_module(meta_model)
    states = model_states(n_params, n_trained, stage, world, precision, zero, block)
    memory = extra["gpu_memory_gb"] * 1e9 if extra["gpu_memory_gb"] else GPUS[extra["gpu"]][0]
    peak_tflops = GPUS.get(extra["gpu"], (0, None))[1] if cuda else None

    # the worst micro-batch: from the data's preflight, else the flags
    longest, most_image = config.data.max_length, 0
    source = f"--max_length {config.data.max_length}"
    if config.data.train_data:
        from .data.preflight import OK, preflight
        from .data.sources import RecordIndex

        checks, _ = preflight(RecordIndex(config.data.train_data, config.data.image_root, config.data.data_format,
                                          config.data.data_cache), encoder, "cached", config.data.data_cache)
        ok = checks.kind == OK
        if ok.any():
            longest, most_image = int(checks.n_tokens[ok].max()), int(checks.n_image_tokens[ok].max())
            source = f"{config.data.train_data}: longest sample {longest} tokens, most image tokens {most_image}"
    if not most_image:
        largest = getattr(processor.image_processor, "max_pixels", None) or (
            processor.image_processor.size.get("longest_edge", 448) ** 2 if hasattr(processor.image_processor, "size")
            and isinstance(processor.image_processor.size, dict) else 448 * 448)
        image_processor = processor.image_processor
        patch = getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 1)
        most_image = min(longest // 2, int(largest // (patch * patch)))
    budget = config.batch.max_tokens_per_batch
    positions = adapter.position_ids(model_cfg) if (config.batch.packing or adapter.padded_batch_positions) else None
    collator = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), positions, multiple_of=max(1, sp),
                        packing=config.batch.packing)
    sample = worst_sample(encoder, longest, most_image)
    attention = "sdpa"

    def micro_batch(tokens_per_batch: Optional[int]):
        copies = max(1, (tokens_per_batch or 0) // sample["input_ids"].shape[1]) if tokens_per_batch else \
            config.batch.micro_batch_size
        return collator([{k: v for k, v in sample.items()} for _ in range(copies)])

    traced = []
    sizes = [budget] if budget else [None]
    for size in sizes:
        micro = micro_batch(size)
        traced.append(trace_activations(config.model.path, model_cfg, config.model, adapter, attention, micro, dtype))
    act = traced[0]
    margin = MARGIN * memory
    peak = states.total + act.peak / max(1, sp)
    fits = peak + margin <= memory
    per_token = act.peak / max(1, sp) / max(1, act.tokens)  # per rank: sequence parallelism splits each row
    free = memory - margin - states.total
    best = int(free / per_token) if per_token > 0 and free > 0 else 0
    flops_counter = FlopsCounter(meta_model, adapter, config.model)
    micro = micro_batch(budget)
    from .loss import LabelRows

    flops = flops_counter(micro.inputs, len(LabelRows.from_labels(micro.labels)), micro.sample_lengths)
    steps_micro = config.batch.grad_accum
    step_flops = flops * steps_micro  # per rank
    step_s = step_flops / (extra["mfu"] * peak_tflops * 1e12) if peak_tflops else None
    report = {
        "command": "python -m ds_vlm.plan " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config.model.path, "world_size": world, "sequence_parallel": sp, "zero_stage": stage,
        "precision": "bf16" if precision == 2 else "fp32", "gpu": extra["gpu"], "gpu_memory_gb": memory / 1e9,
        "parameters": n_params, "trained_parameters": n_trained,
        "per_rank_gb": {"weights": states.weights / 1e9, "gradients": states.gradients / 1e9,
                        "optimizer_states": states.optimizer / 1e9, "zero_buffers": states.buckets / 1e9,
                        "activations": act.peak / max(1, sp) / 1e9, "allocator_margin": margin / 1e9},
        "worst_micro_batch": {"tokens": act.tokens, "image_tokens": act.image_tokens, "from": source},
        "peak_gb_per_rank": peak / 1e9, "fits": fits,
        "max_tokens_per_batch_that_fits": best,
        "step_flops_per_rank": step_flops, "mfu_assumed": extra["mfu"] if peak_tflops else None,
        "step_time_s": step_s, "tokens_per_s": (act.tokens * world / max(1, sp) / step_s) if step_s else None,
        "seconds_to_plan": round(time.perf_counter() - began, 1),
    }
    if not fits:
        report["would_fit"] = alternatives(n_params, n_trained, stage, world, precision, zero, act, memory, margin, sp,
                                           block)
    if extra["out"]:
        with open(extra["out"], "w") as f:
            json.dump(report, f, indent=2)
    return report


def alternatives(n_params, n_trained, stage, world, precision, zero, act, memory, margin, sp, block) -> list[dict]:
    """What would fit instead, each with its predicted peak (GB)."""
    out = []
    for name, st, z, shrink in (("ZeRO-3", 3, zero, 1), ("sequence parallel 2", stage, zero, 2 * max(1, sp)),
                                ("optimizer offloaded to the CPU", stage,
                                 {**zero, "offload_optimizer": {"device": "cpu"}}, 1)):
        if name == "ZeRO-3" and stage == 3:
            continue
        states = model_states(n_params, n_trained, st, world, precision, z, block)
        peak = states.total + act.peak / shrink
        out.append({"change": name, "peak_gb_per_rank": peak / 1e9, "fits": peak + margin <= memory})
    states = model_states(n_params, n_trained, stage, world, precision, zero, block)
    free = memory - margin - states.total
    if free > 0 and act.peak > free * max(1, sp):
        tokens = int(act.tokens * free * max(1, sp) / act.peak)
        out.append({"change": f"--max_tokens_per_batch {tokens}", "peak_gb_per_rank": (states.total + free) / 1e9,
                    "fits": True})
    return out


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render(report: dict) -> str:
    parts = report["per_rank_gb"]
    lines = [f"{report['model']}: {_count(report['parameters'])} parameters, {_count(report['trained_parameters'])} "
             f"trained; ZeRO-{report['zero_stage']} over {report['world_size']} ranks, {report['precision']}, "
             f"{report['gpu']} ({report['gpu_memory_gb']:.1f} GB)",
             f"worst micro-batch: {report['worst_micro_batch']['tokens']} tokens, "
             f"{report['worst_micro_batch']['image_tokens']} image tokens ({report['worst_micro_batch']['from']})",
             "per rank (GB):"]
    lines += [f"  {name.replace('_', ' '):<18} {value:10.4f}" for name, value in parts.items()]
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(f"  {'peak (allocated)':<18} {report['peak_gb_per_rank']:10.4f}  of {report['gpu_memory_gb']:.1f} GB: "
                 f"{verdict}")
    lines.append(f"largest --max_tokens_per_batch that fits: {report['max_tokens_per_batch_that_fits']}")
    if report["step_time_s"]:
        lines.append(f"step: {report['step_flops_per_rank'] / 1e12:.1f} TFLOP per rank, {report['step_time_s']:.2f} s "
                     f"and {report['tokens_per_s']:.0f} tokens/s at an assumed MFU of {report['mfu_assumed']:.0%}")
    for alt in report.get("would_fit", []):
        lines.append(f"  instead: {alt['change']}: {alt['peak_gb_per_rank']:.2f} GB"
                     f" ({'fits' if alt['fits'] else 'does not fit'})")
    lines.append(f"planned in {report['seconds_to_plan']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
