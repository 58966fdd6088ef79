"""DeepSpeed setup and the optimizer step: ds config, model loading, parameter groups, loss."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig
from .data.encode import IGNORE_INDEX
from .metrics import peak_memory_gb
from .models import Adapter, adapter_for

# --------------------------------------------------------------------------- ds config


def resolve_precision(config: TrainConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_ds_config(config: TrainConfig, world_size: int) -> dict:
    """The user's json (ZeRO settings) plus everything the trainer decides.

    A value the trainer owns may be absent or "auto" in the json; any other value that
    differs from what the flags resolve to is an error naming both.
    """
    path = config.deepspeed
    with open(path) as f:
        ds = json.load(f)
    precision = resolve_precision(config)
    owned: list[tuple[tuple[str, ...], Any, str]] = [
        (("train_micro_batch_size_per_gpu",), config.micro_batch_size, "--micro_batch_size"),
        (("gradient_accumulation_steps",), config.grad_accum, "--grad_accum"),
        (("train_batch_size",), config.micro_batch_size * config.grad_accum * world_size,
         "--micro_batch_size x --grad_accum x world size"),
        (("gradient_clipping",), config.grad_clip, "--grad_clip"),
        (("bf16", "enabled"), precision == "bf16", "--precision"),
        (("fp16", "enabled"), False, "--precision (fp16 is not supported: use bf16)"),
        (("optimizer", "params", "lr"), config.lr, "--lr"),
        (("optimizer", "params", "weight_decay"), config.weight_decay, "--weight_decay"),
        (("optimizer", "params", "betas"), [config.adam_beta1, config.adam_beta2], "--adam_beta1/--adam_beta2"),
        (("optimizer", "params", "eps"), config.adam_eps, "--adam_eps"),
    ]
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler': the trainer owns the LR schedule "
                          "(--lr, --warmup_ratio, --min_lr_ratio)")
    optimizer_type = ds.get("optimizer", {}).get("type", "AdamW")
    if optimizer_type.lower() not in ("adamw", "adam"):
        raise ConfigError(f"{path}: optimizer type {optimizer_type!r} is not supported; the trainer uses AdamW")
    for keys, value, flag in owned:
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and not _same(current, value):
            raise ConfigError(f"{path}: {'.'.join(keys)} = {current!r} contradicts {flag} (resolved to {value!r}); "
                              "remove it from the json or set it to \"auto\"")
        node[keys[-1]] = value
    ds["optimizer"]["type"] = "AdamW"
    ds["optimizer"]["params"]["adam_w_mode"] = True
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if precision == "bf16":  # skip steps whose gradients are not finite, as fp32 ZeRO does
        ds["bf16"].setdefault("check_grad_overflow", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


# --------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    adapter: Adapter
    hf_ds_config: Any  # must stay alive while ZeRO-3 models are created


def load_model(config: TrainConfig, ds_config: dict) -> LoadedModel:
    """Load model + processor; under ZeRO-3 the weights arrive already partitioned."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import HfDeepSpeedConfig

    model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    adapter = adapter_for(model_config.model_type)
    # Keeping this object referenced is what makes from_pretrained partition under ZeRO-3.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage", 0) == 3 else None
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    with _full_shapes_in_weight_conversions(hf_ds_config is not None):
        model = AutoModelForImageTextToText.from_pretrained(
            config.model, dtype=dtype, trust_remote_code=config.trust_remote_code)
    processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    getattr(model.config, "text_config", model.config).use_cache = False  # no KV cache while training
    return LoadedModel(model, processor, adapter, hf_ds_config)


@contextmanager
def _full_shapes_in_weight_conversions(zero3: bool):
    """Under ZeRO-3, let transformers' shape-checked weight conversions see full parameter shapes.

    `Transpose(check_dims=True)` (Qwen3-VL-MoE's fused experts) transposes a checkpoint tensor unless
    its shape equals the model parameter's `.shape`; a ZeRO-3 parameter's `.shape` is its empty local
    partition, so a checkpoint already in the model's layout (any transformers 5 save, our own export
    included) was transposed and failed with a size mismatch. Compare with `ds_shape` instead.
    """
    try:
        from transformers.core_model_loading import Transpose
    except ImportError:  # another transformers layout: nothing to fix
        zero3 = False
    if not zero3:
        yield
        return
    original = Transpose.convert

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        if kwargs.get("model") is not None:
            kwargs["model"] = _FullShapes(kwargs["model"])
        return original(self, input_dict, source_patterns, target_patterns, **kwargs)

    Transpose.convert = convert
    try:
        yield
    finally:
        Transpose.convert = original


class _FullShapes:
    """A model seen only through `get_parameter(name).shape`, with ZeRO-3's full shapes."""

    def __init__(self, model):
        self._model = model

    def get_parameter(self, name: str):
        param = self._model.get_parameter(name)
        return SimpleNamespace(shape=getattr(param, "ds_shape", param.shape))


def set_trainable(model: torch.nn.Module, adapter: Adapter, config: TrainConfig) -> dict[str, list]:
    """Freeze everything, then unfreeze the chosen parts; returns {part: [(name, param)]}."""
    parts = adapter.parts(model)
    model.requires_grad_(False)
    if config.train_llm:
        for module in parts.llm:
            module.requires_grad_(True)
    if config.train_projector:
        for module in parts.projector:
            module.requires_grad_(True)
    blocks = config.vision_blocks_to_train
    if blocks == -1:
        for module in parts.vision:
            module.requires_grad_(True)
    elif blocks:
        if blocks > len(parts.vision_blocks):
            raise ConfigError(f"asked to train the last {blocks} vision blocks; the model has {len(parts.vision_blocks)}")
        for block in list(parts.vision_blocks)[-blocks:]:
            block.requires_grad_(True)
    owner = {}
    for part, modules in (("vision", parts.vision), ("projector", parts.projector), ("llm", parts.llm)):
        for module in modules:
            for param in module.parameters():
                owner.setdefault(id(param), part)
    groups: dict[str, list] = {"vision": [], "projector": [], "llm": []}
    for name, param in model.named_parameters():
        if id(param) not in owner:
            raise RuntimeError(f"adapter {adapter.family}: parameter {name} belongs to no part")
        groups[owner[id(param)]].append((name, param))
    return groups


def enable_checkpointing(model: torch.nn.Module, adapter: Adapter, config: TrainConfig) -> None:
    """Non-reentrant activation checkpointing on the language tower (--gradient_checkpointing) and on
    the vision tower's blocks (--vision_checkpointing).

    The token embeddings' output is made to require grad so that frozen embeddings never cut the
    checkpointed graph. Only the token embeddings: transformers' `enable_input_require_grads()` also
    hooks the vision tower's patch embedding (Qwen2-VL, Qwen2.5-VL, CLIP), which makes a frozen vision
    tower build a graph and keep all its activations for a backward that never reaches a parameter.
    """
    parts = adapter.parts(model)
    if config.gradient_checkpointing:
        _checkpoint_blocks(parts.llm_decoder)
        model.get_input_embeddings().register_forward_hook(_output_requires_grad)
    if config.vision_checkpointing:
        if parts.vision_encoder is None:
            raise ConfigError(f"--vision_checkpointing: the {adapter.family} adapter names no vision encoder")
        _checkpoint_blocks(parts.vision_encoder)


def _checkpoint_blocks(module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _output_requires_grad(module, inputs, output):
    output.requires_grad_(True)


def param_groups(groups: dict[str, list], config: TrainConfig) -> list[dict]:
    """Optimizer groups by (learning rate, decay): parts with the same lr share a group (named e.g.
    'projector+llm'); norms, biases and other 1-d tensors get no decay. Fewer groups make ZeRO's
    step cheaper (measured: 4 groups cost ZeRO-2 ~13 ms a step on the tiny model, 2 groups ~6 ms)."""
    lrs = {"vision": config.vision_lr or config.lr, "projector": config.projector_lr or config.lr, "llm": config.lr}
    merged: dict[tuple[float, bool], dict] = {}
    for part, named in groups.items():
        trainable = [(n, p) for n, p in named if p.requires_grad]
        for decay in (True, False):
            params = [p for n, p in trainable if _decays(n, p) == decay]
            if params:
                group = merged.setdefault((lrs[part], decay), {"params": [], "lr": lrs[part], "parts": [],
                                                               "weight_decay": config.weight_decay if decay else 0.0})
                group["params"] += params
                group["parts"].append(part)
    if not merged:
        raise ConfigError("nothing to train: --train_llm, --train_projector and --train_vision are all off")
    out = []
    for (_, decay), group in merged.items():
        parts = group.pop("parts")
        out.append({**group, "name": "+".join(parts) + ("" if decay else "_no_decay")})
    return out


def optimizer_groups(engine) -> list[dict]:
    """Each parameter group as the DeepSpeed optimizer holds it (for run_config.json): name, current lr,
    base lr (before the schedule's factor) and weight decay."""
    return [{"name": g.get("name"), "lr": g["lr"], "initial_lr": g.get("initial_lr"),
             "weight_decay": g["weight_decay"]} for g in engine.optimizer.param_groups]


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params keep their shape here
    return len(shape) >= 2 and "norm" not in name.lower()


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup over ceil(ratio * total) steps, then cosine decay to min_lr_ratio."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------- step


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the label tokens, in fp32."""
    shifted = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over ranks (counts, loss sums) in fp64, exact for any token count."""
    return all_reduce_sum_async(values, device)()


def all_reduce_sum_async(values: list[float], device):
    """Start `all_reduce_sum`; returns a function that waits for it and gives the sums."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    work = dist.all_reduce(tensor, async_op=True) if dist.is_initialized() else None

    def result() -> list[float]:
        if work is not None:
            work.wait()
        return tensor.tolist()

    return result


class StepRunner:
    """One optimizer step over this rank's micro-batches, with a global token-level mean loss.

    DeepSpeed averages gradients over ranks; we skip its 1/grad_accum scaling and scale
    each micro-batch's summed loss by world_size / (label tokens in the global batch),
    so the update is d(sum of all token losses)/dθ divided by the global token count,
    whatever the split into ranks and accumulation steps.

    The global label-token count is needed before the first backward. When the caller knows it
    (`planned_targets`: the training loop reads it from the batch plan and preflight's per-record
    counts) the step itself adds no collective: the logged sums (loss, counts, peak memory) are
    all-reduced asynchronously, and `start()` returns a function that waits for them; the count every
    rank actually saw rides on that reduction and must equal the plan, or it raises. Without a plan,
    a blocking all-reduce before the forward counts the label tokens. (Each extra blocking collective
    is a barrier between phases whose length differs per rank; on the tiny benchmark model they cost
    ~5-10% of a step, measured with launch/bench.py against the transformers Trainer.)
    """

    def __init__(self, engine, world_size: int, dtype: torch.dtype, count_flops=None):
        self.engine, self.world_size, self.dtype = engine, world_size, dtype
        self.count_flops = count_flops or (lambda batch: 0.0)
        self.device = engine.device
        # ZeRO-0 in fp32 keeps no global grad norm; measure it on the reduced grads before the step.
        self._plain_fp32 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    def _grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def run(self, micro_batches: list[tuple[dict, dict]], planned_targets: int | None = None) -> dict:
        """One optimizer step; waits for its logged sums."""
        return self.start(micro_batches, planned_targets)()

    def start(self, micro_batches: list[tuple[dict, dict]], planned_targets: int | None = None):
        """One optimizer step; returns a function that waits for the step's all-reduced sums and
        gives its stats (loss, counts, grad norm, peak memory, skipped)."""
        local = [sum(meta[k] for _, meta in micro_batches) for k in ("targets", "tokens", "samples", "computed")]
        local.append(sum(self.count_flops(batch) for batch, _ in micro_batches))
        n_targets = planned_targets
        if n_targets is None:
            n_targets = all_reduce_sum(local[:1], self.device)[0]
        loss_sum, grad_norm = 0.0, None
        for i, (batch, _) in enumerate(micro_batches):
            batch = self.to_device(batch)
            labels = batch.pop("labels")
            logits = self.engine(**batch).logits
            summed = token_loss_sum(logits, labels)
            self.engine.backward(summed * (self.world_size / n_targets), scale_wrt_gas=False)
            skip_plain = False
            if i == len(micro_batches) - 1 and self._plain_fp32:
                grad_norm = self._grad_norm()
                skip_plain = not math.isfinite(grad_norm)
                if skip_plain:  # what ZeRO 1-3 do on an invalid norm: drop the grads, no update
                    for param in self.engine.module.parameters():
                        param.grad = None
            self.engine.step()
            loss_sum += summed.item()
        # one collective for the loss, the counts and every rank's peak memory (each rank fills its own slot)
        after = [loss_sum, *local] + [0.0] * self.world_size
        after[1 + len(local) + dist.get_rank()] = peak_memory_gb()
        pending = all_reduce_sum_async(after, self.device)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        applied = self.engine.was_step_applied() and not skip_plain

        def finish() -> dict:
            global_loss_sum, seen_targets, n_tokens, n_samples, n_computed, flops, *memory = pending()
            if int(seen_targets) != int(n_targets):
                raise RuntimeError(
                    f"the ranks' micro-batches hold {int(seen_targets)} label tokens, the batch plan said "
                    f"{int(n_targets)} (from preflight's per-record counts): the encoding of some record changed "
                    "between preflight and training, so this step's loss was not normalised by the right count")
            loss = global_loss_sum / n_targets
            return {"loss": loss, "targets": int(n_targets), "tokens": int(n_tokens), "samples": int(n_samples),
                    "computed": int(n_computed), "flops": flops, "peak_mem_gb": [round(m, 4) for m in memory],
                    "grad_norm": float(grad_norm) if grad_norm is not None and math.isfinite(grad_norm) else None,
                    "skipped": not (applied and math.isfinite(loss))}

        return finish

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device; floating ones (pixels) in the model's dtype."""
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in batch.items()}

    @torch.no_grad()
    def eval_loss(self, micro_batches) -> dict:
        """Token-level mean loss over every rank's micro-batches, no update."""
        loss_sum, n_targets = 0.0, 0
        for batch, meta in micro_batches:
            batch = self.to_device(batch)
            labels = batch.pop("labels")
            loss_sum += token_loss_sum(self.engine(**batch).logits, labels).item()
            n_targets += meta["targets"]
        total_loss, total_targets = all_reduce_sum([loss_sum, n_targets], self.device)
        return {"eval_loss": total_loss / max(1, total_targets), "eval_targets": int(total_targets)}
