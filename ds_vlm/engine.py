"""DeepSpeed setup and the optimizer step: ds config, model loading, parameter groups, loss."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .attention import SampleBoundaries, resolve_attention
from .config import ConfigError, TrainConfig
from .loss import LabelLoss, LabelRows
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


def load_model(config: TrainConfig, ds_config: dict, sequence_parallel=None) -> LoadedModel:
    """Load model + processor; under ZeRO-3 the weights arrive already partitioned. With sequence parallelism
    the text model's attention is the Ulysses wrapper around the chosen kernel."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import HfDeepSpeedConfig

    model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    adapter = adapter_for(model_config.model_type)
    # Keeping this object referenced is what makes from_pretrained partition under ZeRO-3.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage", 0) == 3 else None
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    attention = resolve_attention(config.attn_implementation, config.packing)
    if sequence_parallel is not None:
        attention = sequence_parallel.attn_implementation(attention, model_config)
    with adapter.loading(zero3=hf_ds_config is not None):
        model = AutoModelForImageTextToText.from_pretrained(
            config.model, dtype=dtype, trust_remote_code=config.trust_remote_code, attn_implementation=attention)
    processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    getattr(model.config, "text_config", model.config).use_cache = False  # no KV cache while training
    return LoadedModel(model, processor, adapter, hf_ds_config)


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


class StepRunner:
    """One optimizer step over this rank's micro-batches, with the token-level mean loss over the global batch.

    DeepSpeed averages gradients over ranks; we skip its 1/grad_accum scaling and scale each micro-batch's
    summed loss by world_size / (label tokens in the global batch), so the update is d(sum of all token
    losses)/dθ divided by the global token count, whatever the split into ranks and accumulation steps.

    Nothing in a step waits for the device. The step's label tokens are counted on the host from the
    collated labels; their global sum is all-reduced from a device tensor started before the first forward
    and waited for just before the first backward (a stream wait on GPUs). Loss sums stay on the device and
    are all-reduced with the step's other numbers after the optimizer step; the returned `PendingStats`
    reads them (one host sync) only when the step is logged. (ZeRO-0 in fp32 is the exception: DeepSpeed
    keeps no grad norm there, so it is measured on the host to skip non-finite steps.)
    """

    def __init__(self, engine, world_size: int, dtype: torch.dtype, loss: LabelLoss, count_flops=None,
                 boundaries: Optional[SampleBoundaries] = None, sequence_parallel=None, phase=None):
        self.engine, self.world_size, self.dtype, self.loss = engine, world_size, dtype, loss
        self.boundaries, self.sp = boundaries, sequence_parallel
        self.phase = phase or (lambda name: None)  # tells the watchdog what the step is doing
        self.count_flops = count_flops or (lambda batch, n_label_rows: 0.0)
        self.device = engine.device
        self._plain_fp32 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    def _grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def run(self, micro_batches: list[tuple[dict, dict]]) -> dict:
        """One optimizer step; waits for its logged sums."""
        return self.start(micro_batches).result()

    def start(self, micro_batches: list[tuple[dict, dict]], with_stats: bool = True) -> "PendingStats":
        """One optimizer step; its numbers (loss, counts, grad norm, peak memory, skipped) come later, from
        `PendingStats.result()`, and only `with_stats` (a step that is not logged all-reduces nothing more)."""
        all_rows = [LabelRows.from_labels(batch.pop("labels")) for batch, _ in micro_batches]
        label_rows = [self.local_rows(rows, batch) for rows, (batch, _) in zip(all_rows, micro_batches)]
        n_local = sum(len(rows) for rows in label_rows)
        count = torch.full((), float(n_local), dtype=torch.float64, device=self.device)
        counting = _all_reduce(count)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_norm, skip_plain = None, False
        for i, ((batch, meta), rows) in enumerate(zip(micro_batches, label_rows)):
            self.phase("forward")
            summed = self.forward(batch, meta, rows)
            if counting is not None:
                counting.wait()
                counting = None
            self.phase("backward")
            self.engine.backward(summed * (self.world_size / count).float(), scale_wrt_gas=False)
            if i == len(micro_batches) - 1 and self._plain_fp32:
                grad_norm = self._grad_norm()
                skip_plain = not math.isfinite(grad_norm)
                if skip_plain:  # what ZeRO 1-3 do on an invalid norm: drop the grads, no update
                    for param in self.engine.module.parameters():
                        param.grad = None
            self.phase("step")
            self.engine.step()
            loss_sum += summed.detach()
        applied = self.engine.was_step_applied() and not skip_plain
        if not with_stats:
            return PendingStats(None, None, None, applied)
        # a sequence-parallel group shares its micro-batches: each rank counts 1/N of their tokens and FLOPs
        share = 1 / self.sp.size if self.sp else 1
        host = [n_local] + [share * sum(meta[k] for _, meta in micro_batches) for k in ("tokens", "samples", "computed")]
        host.append(share * sum(self.count_flops(batch, len(rows)) for (batch, _), rows in zip(micro_batches, all_rows)))
        memory = [0.0] * self.world_size  # every rank fills its own slot
        memory[dist.get_rank() if dist.is_initialized() else 0] = peak_memory_gb()
        totals = torch.cat([loss_sum.view(1), _on_device(host + memory, self.device)])
        return PendingStats(totals, _all_reduce(totals), grad_norm if grad_norm is not None else
                            self.engine.get_global_grad_norm(), applied)

    def local_rows(self, rows: LabelRows, batch: dict) -> LabelRows:
        """This rank's label rows: all of them, or under sequence parallelism those of its slice."""
        return rows if self.sp is None else self.sp.local_rows(rows, batch["input_ids"].shape[1])

    def forward(self, batch: dict, meta: dict, rows: LabelRows) -> torch.Tensor:
        """The summed loss of one micro-batch (this rank's slice of it under sequence parallelism); a packed
        one's sample boundaries go to the language model."""
        cu_seq_lens = batch.pop("cu_seq_lens", None)
        with contextlib.ExitStack() as stack:
            if cu_seq_lens is not None and self.boundaries is not None:
                stack.enter_context(self.boundaries.armed(cu_seq_lens.to(self.device, non_blocking=True),
                                                          meta["max_length"]))
            if self.sp is not None:
                stack.enter_context(self.sp.armed())
            return self.loss(self.engine, self.to_device(batch), rows.to(self.device))

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (from pinned memory, without waiting); floating ones (pixels) in the model's
        dtype."""
        return {k: v.to(self.device, self.dtype, non_blocking=True) if v.is_floating_point()
                else v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def eval_loss(self, micro_batches) -> dict:
        """Token-level mean loss over every rank's micro-batches, no update."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch, meta in micro_batches:
            rows = self.local_rows(LabelRows.from_labels(batch.pop("labels")), batch)
            totals[0] += self.forward(batch, meta, rows)
            totals[1] += len(rows)
        work = _all_reduce(totals)
        if work is not None:
            work.wait()
        loss_sum, n_targets = totals.tolist()
        return {"eval_loss": loss_sum / max(1, n_targets), "eval_targets": int(n_targets)}


@dataclass
class PendingStats:
    """A step's numbers, all-reduced in the background; `result()` waits and reads them (one host sync)."""

    totals: Optional[torch.Tensor]  # loss sum, label tokens, tokens, samples, computed, flops, peak GB per rank
    work: Any
    grad_norm: Any                  # a float or a device tensor (DeepSpeed's), read in result()
    applied: bool                   # the optimizer step was taken (False: non-finite gradients, skipped)

    def result(self) -> dict:
        if self.work is not None:
            self.work.wait()
        loss_sum, n_targets, n_tokens, n_samples, n_computed, flops, *memory = self.totals.tolist()
        loss = loss_sum / n_targets
        norm = float(self.grad_norm) if self.grad_norm is not None else None
        return {"loss": loss, "targets": int(n_targets), "tokens": int(n_tokens), "samples": int(n_samples),
                "computed": int(n_computed), "flops": flops, "peak_mem_gb": [round(m, 4) for m in memory],
                "grad_norm": norm if norm is not None and math.isfinite(norm) else None,
                "skipped": not (self.applied and math.isfinite(loss))}


def _all_reduce(tensor: torch.Tensor):
    """Start a sum over ranks in place; returns the work handle (None outside a process group)."""
    return dist.all_reduce(tensor, async_op=True) if dist.is_initialized() else None


def _on_device(values: list[float], device) -> torch.Tensor:
    """Host numbers as a float64 device tensor, copied without blocking the host (pinned on GPUs)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
