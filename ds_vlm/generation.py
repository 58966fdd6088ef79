"""Greedy answers of a model to samples' prompts: the evaluations during training and `ds_vlm.evaluate`."""

from __future__ import annotations

import torch

from .data.encode import template_message
from .data.images import load_images
from .data.videos import VideoSampling, load_videos


def generate_answers(model, processor, samples: list, max_new_tokens: int = 32, batch_size: int = 16,
                     video_sampling: VideoSampling | None = None, **generate_kwargs) -> list[str]:
    """Greedy answers to each sample's messages up to (not including) its last assistant turn; videos are
    sampled as in training (`video_sampling`: the run's --video_fps / --video_max_frames)."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return _generate(model, processor, samples, max_new_tokens, batch_size, video_sampling or VideoSampling(),
                         generate_kwargs)
    finally:
        tokenizer.padding_side = side


def _generate(model, processor, samples, max_new_tokens, batch_size, video_sampling, generate_kwargs) -> list[str]:
    tokenizer = processor.tokenizer
    answers = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        texts, images, videos = [], [], []
        for sample in chunk:
            last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
            prompt = [template_message(m) for m in sample.messages[:last]]
            texts.append(processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
            images.append(load_images(sample))  # per sample: Gemma 3's processor counts each prompt's images
            videos.extend(load_videos(sample, video_sampling))
        media = {}
        if videos:  # sampled already: the processor takes the frames and their timestamps as they are
            media = dict(videos=[frames for frames, _ in videos], video_metadata=[meta for _, meta in videos],
                         do_sample_frames=False)
        inputs = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True,
                           add_special_tokens=False, **media)
        device = next(model.parameters()).device
        inputs = {k: v.to(device, model.dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    **generate_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def reference(sample) -> str:
    last = [m for m in sample.messages if m["role"] == "assistant"][-1]
    return "".join(p.get("text", "") for p in last["content"]).strip()
