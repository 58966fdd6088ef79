"""GLM-4.6V (transformers' `glm46v`): model.model.visual (patch embedding, position embeddings, blocks, then a 2 x 2
conv `downsample` and the `merger`), model.model.language_model (GLM-4 text with a 3-d rope), lm_head.

Its rope is Qwen's kind with its own index function (`Glm46VModel.get_rope_index`: an image's positions advance by
max(h, w) / merge, a video's frames are separated by their timestamps). The collator runs that function on the host
for each sample (`RopeIndex`, as for Qwen), so the positions of packed samples restart at each sample and never see
each other's, and the language tower gets the 4-row layout (text positions first) from which transformers builds the
block-diagonal mask of a packed row. Padded batches carry the same host positions (the model would otherwise compute
them in the forward, reading token types back to the host row by row).

A video: the template writes `<|begin_of_video|><|video|><|end_of_video|>`; the processor expands the <|video|> into
each frame pair (temporal patch 2) as `<|begin_of_image|>` + h w / merge^2 <|image|> + `<|end_of_image|>` + the pair's
first frame's timestamp (`0.0 seconds`, from the sampled frames' metadata), and returns `pixel_values_videos` and
`video_grid_thw` (t pairs, h, w). A video's features fill the image token (`video_fill`); `mm_token_type_ids` marks
them 2 (inside <|begin_of_video|> ... <|end_of_video|>), an image's 1. The rope index splits a video into its frame
pairs, each positioned as an image of grid (1, h, w) after the text before it (the timestamps); the collator runs it on
the host per sample, as for images.

The model's forward cannot take an image and a video together: it finds both by input_ids == image_token_id, so with
both present its check fails ("Image features and image tokens do not match"; transformers says GLM does no mixed
input), and every micro-batch with a video has an image (the dummy, or a record's). `model_inputs` therefore hands it
a micro-batch's video frame pairs as images, in the order their tokens come: the pixel rows and (1, h, w) grids of the
images and frame pairs merged, and the video tokens' type 2 -> 1. That is what the model computes for a video: its
`get_video_features` runs the vision tower on each frame pair as an image of grid (1, h, w), and its rope index
positions each pair as such an image; the host positions come from the unmerged sample.
"""

from __future__ import annotations

import torch

from ds_vlm.models.base import ModelParts
from ds_vlm.models.qwen import QwenVLAdapter


class Glm46VAdapter(QwenVLAdapter):
    family = "glm46v"
    model_types = ("glm46v",)
    image_text = "<|begin_of_image|><|image|><|end_of_image|>"
    video_text = "<|begin_of_video|><|video|><|end_of_video|>"  # as the released template writes a video part
    video_fill = "<|image|>"
    # the released template ends an answer with nothing: generation stops at these (its generation config's eos)
    answer_stops = ("<|endoftext|>", "<|user|>", "<|observation|>")

    def parts(self, model) -> ModelParts:
        visual = model.model.visual
        return ModelParts(
            vision=[visual.patch_embed, visual.post_conv_layernorm, visual.embeddings, visual.blocks,
                    visual.post_layernorm],  # rotary_pos_emb holds buffers only
            vision_blocks=visual.blocks,
            projector=[visual.downsample, visual.merger],
            llm=[model.model.language_model, model.lm_head],
            llm_decoder=model.model.language_model,
            vision_encoder=visual,
        )

    def vision_depth_width(self, config) -> tuple[int, int]:
        return config.vision_config.depth, config.vision_config.hidden_size

    def model_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The videos' frame pairs as images, in token order (see above); inputs without a video as they are."""
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            return inputs
        types = inputs["mm_token_type_ids"]
        runs = _runs(types.flatten())  # (type, length) of each image's or frame pair's tokens, in order
        items = {1: _items(inputs.get("pixel_values"), inputs.get("image_grid_thw")),
                 2: _items(videos, inputs["video_grid_thw"], per_frame=True)}
        kinds = [kind for kind, _ in runs]
        if kinds.count(1) != len(items[1]) or kinds.count(2) != len(items[2]):
            raise ValueError(f"glm46v: {len(items[1])} image(s) and {len(items[2])} video frame pair(s) in the vision "
                             f"tensors, but {kinds.count(1)} image and {kinds.count(2)} frame token runs in the ids")
        taken = {kind: iter(found) for kind, found in items.items()}
        ordered = [next(taken[kind]) for kind in kinds]
        # every run holds its item's patches over merge^2 tokens: one ratio for all
        patches, tokens = sum(int(grid.prod()) for _, grid in ordered), sum(n for _, n in runs)
        if any(int(grid.prod()) * tokens != n * patches for (_, grid), (_, n) in zip(ordered, runs)):
            raise ValueError("glm46v: the image and video token runs do not follow the vision tensors' grids")
        out = {k: v for k, v in inputs.items() if k not in ("pixel_values_videos", "video_grid_thw")}
        out["pixel_values"] = torch.cat([rows for rows, _ in ordered])
        out["image_grid_thw"] = torch.stack([grid for _, grid in ordered])
        out["mm_token_type_ids"] = torch.where(types == 2, torch.ones_like(types), types)
        return out


def _runs(types: torch.Tensor) -> list[tuple[int, int]]:
    """(type, length) of each run of image (1) or video (2) tokens in a flat row of token types (each image and
    frame pair is one: <|begin_of_image|> and <|end_of_image|> are text)."""
    edges = (torch.nonzero(types[1:] != types[:-1]).flatten() + 1).tolist()
    bounds = [0, *edges, types.numel()]
    return [(int(types[a]), b - a) for a, b in zip(bounds, bounds[1:]) if int(types[a]) in (1, 2)]


def _items(pixels, grids, per_frame: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel rows, grid) of each image, or with `per_frame` of each video frame pair (grid (1, h, w))."""
    if pixels is None:
        return []
    out, start = [], 0
    for t, h, w in grids.tolist():
        for grid in ([(1, h, w)] * t if per_frame else [(t, h, w)]):
            size = grid[0] * grid[1] * grid[2]
            out.append((pixels[start:start + size], torch.tensor(grid, dtype=grids.dtype)))
            start += size
    if start != pixels.shape[0]:
        raise ValueError(f"glm46v: the grids cover {start} pixel rows of {pixels.shape[0]}")
    return out
