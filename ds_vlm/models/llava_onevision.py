"""LLaVA-OneVision (transformers' `llava_onevision`): the generic adapter's parts (model.model.vision_tower (SigLIP),
multi_modal_projector, language_model (Qwen2), lm_head; model.model.image_newline trains with the projector), with the
video path the generic adapter does not have.

A video is `pixel_values_videos` (videos, frames, 3, H, W), every frame resized by the video processor to the vision
tower's size. The model projects each frame's patch features, pools them 2 x 2 (bilinear, to ceil(h / 2) x ceil(w / 2)
of a frame's h x w patches), writes the frames one after another and closes the video with one image_newline: frames x
ceil(h / 2) x ceil(w / 2) + 1 <video> tokens (a 384-pixel frame at patch 14: 27 x 27 patches, 196 tokens). An image is
counted otherwise (anyres: the token count follows its aspect ratio); a frame's does not, its size being fixed.

The model takes a batch's videos as one tensor, so they must all have the same number of frames: every video is
sampled to exactly --video_max_frames frames, spread evenly over it (`video_frames_fixed`); --video_fps is not used.
"""

from __future__ import annotations

import math

import torch

from ds_vlm.models.generic import GenericAdapter


class LlavaOnevisionAdapter(GenericAdapter):
    video_text = "<video>"  # the released template writes it for a video part; the processor expands it
    video_frames_fixed = True

    def __init__(self):
        super().__init__("llava_onevision")

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        """The images' tiles (the generic count), then every video frame, each seen alone by the vision tower."""
        out = super().patches_per_image(batch, config)
        videos = batch.get("pixel_values_videos")
        if videos is not None:
            patch = config.vision_config.patch_size
            frames = videos.reshape(-1, *videos.shape[-3:]).shape[0]
            out += [(videos.shape[-2] // patch) * (videos.shape[-1] // patch)] * frames
        return out

    def vision_token_counts(self, encoded: dict[str, torch.Tensor], processor) -> dict[str, int]:
        """Video tokens the sample's frames fill: per video, its frames x the pooled patch grid of a frame of their
        size, + the newline. The patch size is the tower's tile over the patches a side of its `num_image_tokens`."""
        videos = encoded.get("pixel_values_videos")
        if videos is None:
            return {"video": 0}
        n_videos, n_frames, _, height, width = videos.shape
        patch = processor.image_processor.size["height"] // math.isqrt(processor.num_image_tokens)  # dict or SizeDict
        pooled = math.ceil(height // patch / 2) * math.ceil(width // patch / 2)
        return {"video": n_videos * (n_frames * pooled + 1)}
