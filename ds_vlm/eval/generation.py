"""Greedy answers of a model to samples' prompts: the evaluations during training and `ds_vlm.eval.cli`."""

from __future__ import annotations

import torch

from ds_vlm.data.encode import TOKEN_KEYS, Encoder, cat_rows
from ds_vlm.data.videos import VideoSampling
from ds_vlm.models import adapter_for


def prompt_batch(encoder: Encoder, samples: list) -> dict[str, torch.Tensor]:
    """The samples' prompts (Encoder.prompt: text spelling special tokens stays text, as in training; media as
    Encoder.media gives them, videos sampled as the encoder samples them), padded on the left as the processor pads
    a batch; vision tensors concatenated (zero-padded where their tiles or frames differ in count, as the collator
    pads them), as the model takes them (Adapter.model_inputs)."""
    prompts = [encoder.prompt(s, *encoder.media(s)) for s in samples]
    length = max(p["input_ids"].shape[1] for p in prompts)
    pad_id = encoder.tokenizer.pad_token_id
    batch: dict[str, list[torch.Tensor]] = {}
    for prompt in prompts:
        for key, value in prompt.items():
            if key in TOKEN_KEYS:
                value = torch.nn.functional.pad(value, (length - value.shape[1], 0),
                                                value=pad_id if key == "input_ids" else 0)
            batch.setdefault(key, []).append(value)
    return encoder.adapter.model_inputs({key: torch.cat(values) if key in TOKEN_KEYS else cat_rows(values)
                                         for key, values in batch.items()})


def generate_answers(model, processor, samples: list, max_new_tokens: int = 32, batch_size: int = 16,
                     video_sampling: VideoSampling | None = None, **generate_kwargs) -> list[str]:
    """Greedy answers to each sample's messages up to (not including) its last assistant turn; videos are
    sampled as in training (`video_sampling`: the run's --video_fps / --video_max_frames)."""

    encoder = Encoder(processor, adapter_for(model.config.model_type), max_length=0, video_sampling=video_sampling)
    answers = []
    for start in range(0, len(samples), batch_size):
        inputs = prompt_batch(encoder, samples[start:start + batch_size])
        device = next(model.parameters()).device
        inputs = {k: v.to(device, model.dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        family = adapter_for(model.config.model_type).generation_kwargs()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    **family, **generate_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers.extend(t.strip() for t in encoder.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def reference(sample) -> str:
    last = [m for m in sample.messages if m["role"] == "assistant"][-1]
    return "".join(p.get("text", "") for p in last["content"]).strip()
