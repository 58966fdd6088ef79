"""The model of a run: loaded (partitioned under ZeRO-3, quantized for QLoRA), then `prepare_for_training`, the
one preparation sequence (the trainer's, the planner's trace, check-model's and the benchmarks'): the adapter's
load-time changes, no KV cache, the trainable parts, LoRA, activation checkpointing, sequence parallelism."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from ds_vlm.config import ConfigError, ModelConfig
from ds_vlm.models import Adapter, adapter_for
from ds_vlm.models import model_config as load_config
from ds_vlm.models.base import set_use_cache
from ds_vlm.models.lora import apply_lora
from ds_vlm.patches.torch_modules import embeddings_output_requires_grad

if TYPE_CHECKING:
    from ds_vlm.train.ds_config import DSSettings


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    adapter: Adapter
    hf_ds_config: Any  # must stay alive while ZeRO-3 models are created


def load_model(config: ModelConfig, ds: DSSettings, attention: str, sequence_parallel=None,
               packing: bool = False) -> LoadedModel:
    """Load model + processor with the attention implementation `attention` (attention.resolve_attention's), in
    the dtype of `ds` (the run's DSSettings); under ZeRO-3 the weights arrive already partitioned. With sequence
    parallelism the text model's attention is the Ulysses wrapper around `attention`. A model packing would not
    keep exact is refused before loading (ConfigError), and a model type with no adapter by name
    (UnsupportedModel). The model is as transformers loads it: `prepare_for_training` comes next."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import HfDeepSpeedConfig

    model_config = load_config(config.path, config.trust_remote_code)
    adapter = adapter_for(model_config.model_type)
    adapter.check_layout(model_config)
    for flag, refusal in (("--packing", adapter.packing_refusal(model_config) if packing else ""),
                          ("--sequence_parallel", adapter.sequence_parallel_refusal(model_config)
                           if sequence_parallel is not None else "")):
        if refusal:
            raise ConfigError(f"{flag}: {refusal}")
    # Keeping this object referenced is what makes from_pretrained partition under ZeRO-3.
    hf_ds_config = HfDeepSpeedConfig(ds.json) if ds.stage == 3 else None
    dtype = ds.dtype
    if sequence_parallel is not None:
        attention = sequence_parallel.attn_implementation(attention, model_config)
    quantization = quantization_config(config, adapter, dtype, hf_ds_config is not None, model_config)
    # 4-bit weights are quantized as they reach the device: load them onto this rank's own (a CPU without one)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    quantized = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
    with adapter.loading(zero3=hf_ds_config is not None):
        model = AutoModelForImageTextToText.from_pretrained(
            config.path, dtype=dtype, trust_remote_code=config.trust_remote_code, attn_implementation=attention,
            **quantized)
    processor = AutoProcessor.from_pretrained(config.path, trust_remote_code=config.trust_remote_code)
    return LoadedModel(model, processor, adapter, hf_ds_config)


@dataclass
class Prepared:
    """What `prepare_for_training` gives: what DeepSpeed trains (peft's wrapper with LoRA, else the model itself),
    peft's LoraConfig (None: full fine-tuning) and the parameters by part ({part: [(name, param)]})."""

    trained: torch.nn.Module
    lora: Optional[Any]
    groups: dict[str, list]


def prepare_for_training(model: torch.nn.Module, adapter: Adapter, config: ModelConfig, *, family_changes: bool = True,
                         checkpointing: bool = True, sequence_parallel=None) -> Prepared:
    """The one preparation of a model for training, in this order: the adapter's load-time changes
    (`Adapter.prepare`), the KV cache off, the trainable parts (`set_trainable`; the generic adapter refuses
    here), LoRA where --lora_rank asks (peft changes `model` in place and wraps it), activation checkpointing as
    `config` says, and the sequence-parallel slicing on the language model. What differs between callers:
    `family_changes` False leaves the model as transformers builds it (the baselines ds-vlm is compared with);
    `checkpointing` False leaves the config's checkpointing flags unapplied (the HF Trainer baseline applies its
    own, check-model compares forwards); `sequence_parallel` a SequenceParallel (the run's, or the trace's
    one-rank stand-in)."""
    if family_changes:
        adapter.prepare(model)
    set_use_cache(model.config, False)  # no KV cache while training (the top-level flag too: SmolVLM reads it)
    groups = set_trainable(model, adapter, config)
    trained, lora = model, None
    if config.lora_rank:
        trained, lora = apply_lora(model, adapter, config)
        groups = part_parameters(model, adapter)
    if checkpointing:
        enable_checkpointing(model, adapter, config)
    if sequence_parallel is not None:
        sequence_parallel.install(adapter.parts(model).llm_decoder, adapter)
    return Prepared(trained, lora, groups)


def quantization_config(config: ModelConfig, adapter: Adapter, dtype, zero3: bool, model_config):
    """--lora_bits 4 (QLoRA): the language tower's frozen linear weights in 4-bit NF4 through bitsandbytes (on a
    GPU, or on a CPU); the vision tower, projector and LM head stay in `dtype` (`full_precision_modules`, named
    from `model_config`'s model built on the meta device). Refused where it cannot run."""
    if not config.lora_bits:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--lora_bits 4 needs the bitsandbytes package (pip install bitsandbytes)")
    if zero3:
        raise ConfigError("--lora_bits 4 does not work with ZeRO-3 (4-bit weights cannot be partitioned); use "
                          "ds_configs/zero2.json, or --lora_bits 0")
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(copy.deepcopy(model_config),
                                                           trust_remote_code=config.trust_remote_code)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True,
                              llm_int8_skip_modules=full_precision_modules(skeleton, adapter))


def full_precision_modules(model: torch.nn.Module, adapter: Adapter) -> list[str]:
    """What QLoRA keeps out of 4-bit: the adapter's vision tower and projector modules and the LM head, by full
    module name (`model.visual.blocks`, `model.multi_modal_projector`, `lm_head`). transformers' matcher
    (`should_convert_module`) reads each as a regex matched from a name's start up to a module boundary, or as a
    suffix, so a short name (`visual`) kept nothing inside `model.visual`; the names are escaped (a regex `.`
    would match any character). Every other linear layer, the language tower's, is converted."""
    parts = adapter.parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    keep = [*parts.vision, *parts.projector, model.get_output_embeddings()]
    return sorted({re.escape(names[id(m)]) for m in keep})


def set_trainable(model: torch.nn.Module, adapter: Adapter, config: ModelConfig) -> dict[str, list]:
    """Freeze everything, then unfreeze the chosen parts; returns {part: [(name, param)]}. Quantized weights
    (QLoRA's 4-bit ones, stored as integers) stay frozen inside a trained part: LoRA trains beside them."""
    parts = adapter.parts(model)
    model.requires_grad_(False)
    chosen = []
    if config.train_llm:
        chosen += parts.llm
    if config.train_projector:
        chosen += parts.projector
    blocks = config.vision_blocks_to_train
    if blocks == -1:
        chosen += parts.vision
    elif blocks:
        if blocks > len(parts.vision_blocks):
            raise ConfigError(f"asked to train the last {blocks} vision blocks; the model has "
                              f"{len(parts.vision_blocks)}")
        chosen += list(parts.vision_blocks)[-blocks:]
    loose = parts.projector_parameters if config.train_projector else []
    for param in [p for module in chosen for p in module.parameters()] + loose:
        if param.is_floating_point():
            param.requires_grad_(True)
    return part_parameters(model, adapter)


def part_parameters(model: torch.nn.Module, adapter: Adapter) -> dict[str, list]:
    """{part: [(name, param)]} for every parameter of the model (LoRA's included, once applied)."""
    parts = adapter.parts(model)
    owner = {}
    for part, modules in (("vision", parts.vision), ("projector", parts.projector), ("llm", parts.llm)):
        for module in modules:
            for param in module.parameters():
                owner.setdefault(id(param), part)
    for param in parts.projector_parameters:
        owner.setdefault(id(param), "projector")
    groups: dict[str, list] = {"vision": [], "projector": [], "llm": []}
    for name, param in model.named_parameters():
        if id(param) not in owner:
            raise RuntimeError(f"adapter {adapter.family}: parameter {name} belongs to no part")
        groups[owner[id(param)]].append((name, param))
    return groups


def enable_checkpointing(model: torch.nn.Module, adapter: Adapter, config: ModelConfig) -> None:
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
        embeddings_output_requires_grad(model.get_input_embeddings())  # ds_vlm/patches/torch_modules.py
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

