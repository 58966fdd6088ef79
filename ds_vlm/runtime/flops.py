"""Model FLOPs of a training step (`FlopsCounter`: from the model as it trains and the batch shapes), the weights
a parameter holds, and GPUs' peak TFLOP/s: what MFU is measured against."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ds_vlm.config import ModelConfig


# Dense bf16 peak TFLOP/s per GPU, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "L40": 181.0, "A6000": 155.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0, "V100": 125.0}


def device_peak_tflops(configured: float) -> float | None:
    """--peak_tflops if given, else the table's value for this GPU; None on CPU or an unknown GPU."""
    import torch

    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    return peak_tflops_of(torch.cuda.get_device_name())


def peak_tflops_of(name: str) -> float | None:
    """The table's bf16 peak for a GPU named `name` (its device name, or the planner's --gpu), or None."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name.upper()), None)


def weight_count(param) -> int:
    """The weights a parameter holds: a 4-bit one (bitsandbytes' Params4bit: two weights a byte, `numel()` half
    of them) by its quant_state's shape, a ZeRO-3 partitioned one by its full size."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is not None:
        return math.prod(shape)
    return getattr(param, "ds_numel", param.numel())


_ADAPTER = re.compile(r"(^|\.)lora_[AB]\.")


def _weights(*modules, skip=()) -> tuple[int, int]:
    """(base weights, LoRA adapter weights) of the modules' matmuls, each shared tensor once, 4-bit and ZeRO-3
    ones by their real size (weight_count); embeddings (a lookup, not a matmul) and the `skip` modules left out."""
    import torch

    skipped = {id(p) for m in skip for p in m.parameters()}
    skipped |= {id(p) for m in modules if m is not None for e in m.modules() if isinstance(e, torch.nn.Embedding)
                for p in e.parameters()}
    base, adapters = {}, {}
    for module in modules:
        for name, param in ([] if module is None else module.named_parameters()):
            if id(param) not in skipped:
                (adapters if _ADAPTER.search(name) else base)[id(param)] = param
    return sum(map(weight_count, base.values())), sum(map(weight_count, adapters.values()))


# The chunk of the gated delta rule, in FLA's kernels and in transformers' torch path alike.
DELTA_RULE_CHUNK = 64


def token_mixing(text_config) -> tuple[int, int]:
    """How a language tower's layers mix tokens, for the FLOP count: (its full-attention layers, the forward FLOPs
    per token of its linear-attention layers beyond their weights).

    A full-attention layer's QK^T and AV grow with its sample's length (FlopsCounter). A Gated DeltaNet layer
    (Qwen3.5's `linear_attention` in `layer_types`) is linear in the length: its projections and its depthwise
    conv are weight matmuls, already 2 x parameters per token (the conv's K taps per channel are its K x channels
    weights); its chunked delta rule adds, per token and value head (query and key heads are repeated to the
    value heads they serve), with d_k, d_v the head dims and C the chunk:
    - 6 d_k d_v: the state read by the query, by the keys (the values it already predicts) and its update,
      three (C x d_k) by (d_k x d_v) products per chunk;
    - C (5 d_k + 3 d_v): within the chunk, q k^T and (beta k) k^T (2 C^2 d_k each), the triangular solves for
      the new values and the decayed keys (C^2 d_v + C^2 d_k), the chunk's attention times the new values
      (2 C^2 d_v), divided over its C tokens.
    The gates, decays and norms (elementwise) are left out, as elsewhere."""
    layer_types = list(getattr(text_config, "layer_types", None) or ())
    linear = layer_types.count("linear_attention")
    if not linear:
        return text_config.num_hidden_layers, 0
    d_k, d_v = text_config.linear_key_head_dim, text_config.linear_value_head_dim
    per_head = 6 * d_k * d_v + DELTA_RULE_CHUNK * (5 * d_k + 3 * d_v)
    return text_config.num_hidden_layers - linear, linear * text_config.linear_num_value_heads * per_head


class FlopsCounter:
    """Model FLOPs of a training step from the model as it trains (LoRA applied, 4-bit weights), the config and
    the batch shapes (no recomputation counted).

    A matmul with W weights costs 2 W a token forward; its backward 2 W for the input gradient where the gradient
    must go on (something before it trains, or LoRA inside its part), and 2 W for the weight gradient where the
    weight trains: a trained part x3, a frozen part gradients pass through x2, a frozen part with nothing
    trained before it x1 (forward only). Attention's QK^T and AV (no weights): x3 where gradients pass, else x1.
    LoRA's adapters (A and B) x3 for the tokens of their part, counted apart from the frozen weights they sit
    beside. In forward order: the vision tower's patch embedding, its blocks (with `--train_vision last:N` only
    the last N train; the blocks before them run forward only), the projector, the language tower, the LM head.

    Per token of the language tower: 2 x its non-embedding, non-head weights, plus 4 x full-attention layers x
    attention width x its sample's length for QK^T and AV (padding and other samples of a packed row are not
    attended to, so they count nothing), plus its linear-attention layers' delta rule, the same for every token
    (`token_mixing`; no weights: multiplied as attention is); the LM head on label rows only (the loss computes
    logits nowhere else). Per vision patch the same, each block's attention over the spans its adapter names
    (`vision_attention_pairs`: an image whole, or Qwen2.5-VL's windows), the projector per row it runs over (a
    patch; Qwen's mergers: a merged square of them).
    """

    def __init__(self, model, adapter, config: ModelConfig):
        text = model.config.get_text_config()
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        parts = adapter.parts(model)
        self.adapter, self.model_config = adapter, model.config
        blocks = list(parts.vision_blocks)
        self.n_llm, self.n_llm_lora = _weights(*parts.llm, skip=(embed, head))
        self.n_head = _weights(head)[0]
        self.n_vision, n_vision_lora = _weights(*parts.vision)
        self.n_projector, self.n_projector_lora = _weights(*parts.projector)
        self.block_weights = [_weights(block) for block in blocks]  # (base, LoRA) of each block whose output is used
        self.n_vision_rest = self.n_vision - sum(b for b, _ in self.block_weights)  # patch embedding, unused blocks
        self.n_vision_rest_lora = n_vision_lora - sum(a for _, a in self.block_weights)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.text_layers, self.linear_per_token = token_mixing(text)
        self.text_width = text.num_attention_heads * head_dim
        self.vision_width = adapter.vision_depth_width(model.config)[1]

        # a part holding LoRA trains through its adapters only (lora.fully_trained); walk in forward order
        chosen = config.vision_blocks_to_train
        first_trained = 0 if chosen == -1 else len(blocks) - (chosen or 0)
        vision_full = chosen is not None and not n_vision_lora
        rest_trains = chosen == -1 and not n_vision_lora
        self.mult_vision_rest, before = (3 if rest_trains else 1), rest_trains
        self.mult_blocks = []  # (weights, attention) multipliers of each used block
        for i, (_, lora) in enumerate(self.block_weights):
            weights, before = _multiplier(vision_full and i >= first_trained, lora > 0, before)
            self.mult_blocks.append((weights, 3 if weights > 1 else 1))
        self.mult_projector, before = _multiplier(config.train_projector and not self.n_projector_lora,
                                                  self.n_projector_lora > 0, before)
        llm_full = config.train_llm and not self.n_llm_lora
        self.mult_llm, before = _multiplier(llm_full, self.n_llm_lora > 0, before)
        self.mult_head, _ = _multiplier(llm_full, False, before)

    def __call__(self, batch: dict, n_label_rows: int, sample_lengths: list[int]) -> float:
        """FLOPs of one micro-batch: the language tower over the real tokens of each sample (`sample_lengths`:
        a packed row's samples, or each padded row's unpadded length), attention within each sample only, so
        a packed row and the same samples padded count alike."""
        tokens = sum(sample_lengths)
        text_attention = (4 * self.text_layers * self.text_width * sum(n * n for n in sample_lengths)
                          + self.linear_per_token * tokens)
        text = (self.mult_llm * 2 * self.n_llm * tokens + 3 * 2 * self.n_llm_lora * tokens
                + (3 if self.mult_llm > 1 else 1) * text_attention + self.mult_head * 2 * self.n_head * n_label_rows)
        n_patches = sum(self.adapter.patches_per_image(batch, self.model_config))
        if not n_patches:
            return text
        pairs = self.adapter.vision_attention_pairs(batch, self.model_config)  # each block's, in order
        vision = (self.mult_vision_rest * 2 * self.n_vision_rest + 3 * 2 * self.n_vision_rest_lora) * n_patches
        for i, block_pairs in enumerate(pairs):
            weights, attention = self.mult_blocks[i] if i < len(self.mult_blocks) else (1, 1)  # unused: forward
            vision += attention * 4 * self.vision_width * block_pairs
            if i < len(self.block_weights):
                base, lora = self.block_weights[i]
                vision += (weights * 2 * base + 3 * 2 * lora) * n_patches
        projector = (self.mult_projector * 2 * self.n_projector + 3 * 2 * self.n_projector_lora) * \
            self.adapter.projector_rows(n_patches, self.model_config)
        return text + vision + projector


def _multiplier(trains: bool, has_lora: bool, trained_before: bool) -> tuple[int, bool]:
    """(a part's weights' multiplier, whether anything up to and including it trains): x3 trained, x2 where the
    gradient passes (to a part trained before it, or to its own LoRA), x1 forward only."""
    passes = trained_before or has_lora
    return (3 if trains else 2 if passes else 1), trained_before or trains or has_lora
