"""GLM-4.6V (transformers' `glm46v`): model.model.visual (patch embedding, position embeddings, blocks, then a 2 x 2
conv `downsample` and the `merger`), model.model.language_model (GLM-4 text with a 3-d rope), lm_head.

Its rope is Qwen's kind with its own index function (`Glm46VModel.get_rope_index`: an image's positions advance by
max(h, w) / merge, a video's frames are separated by their timestamps). The collator runs that function on the host
for each sample (`RopeIndex`, as for Qwen), so the positions of packed samples restart at each sample and never see
each other's, and the language tower gets the 4-row layout (text positions first) from which transformers builds the
block-diagonal mask of a packed row. Padded batches carry the same host positions (the model would otherwise compute
them in the forward, reading token types back to the host row by row).

Video is not wired: GLM writes each frame with its timestamp (`<|begin_of_video|>` + per-frame `<|begin_of_image|>
<|image|>...<|end_of_image|>` + the second), which the encoder's video path does not write; a record with video is
refused by name.
"""

from __future__ import annotations

from ds_vlm.models.base import ModelParts
from ds_vlm.models.qwen import QwenVLAdapter


class Glm46VAdapter(QwenVLAdapter):
    family = "glm46v"
    model_types = ("glm46v",)
    image_text = "<|begin_of_image|><|image|><|end_of_image|>"
    video_text = ""  # not wired (see above)
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
