"""Every family's tiny random model, built one way: one table row per family (its transformers classes and
its vision tower's shape), one language tower shape for all (2 layers of width 64; Qwen3.5: 4, to keep its
hybrid pattern of 3 linear-attention layers and 1 full-attention one), the demo's 64x64 images
turned into 16 image tokens by every family's processor (Qwen2-VL and Qwen2.5-VL resize them to 112 x 112 for their
patch of 14)."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_SIZE = 64  # the demo's images
# The language tower of every tiny family; mrope sections (Qwen) must sum to head_dim / 2.
TEXT = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
MROPE = [4, 2, 2]


@dataclass
class TinyModel:
    config: object       # the transformers config
    model_class: type    # its *ForConditionalGeneration class
    processor: object    # processor with the demo tokenizer


@dataclass(frozen=True)
class TinySpec:
    """What differs between families' tiny models (names of transformers classes, to import lazily)."""

    config: str
    model: str
    processor: str
    vision: dict
    patch: int                              # image patch size
    pixels: tuple[int, int] = (IMAGE_SIZE ** 2 // 4, IMAGE_SIZE ** 2)  # the processor's (min, max) image area
    rope: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)  # more language-tower keys (MoE, token ids)
    video_processor: str = "Qwen2VLVideoProcessor"
    tokenizer: str = "Qwen2Tokenizer"       # the released checkpoints' tokenizer class
    thinking: bool = False                  # the released chat template writes a <think> block per answer


QWEN3_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=(IMAGE_SIZE // 8) ** 2,
                    deepstack_visual_indexes=[0])
QWEN3_5_VISION = {k: v for k, v in QWEN3_VISION.items() if k != "deepstack_visual_indexes"}
# Qwen3.5's hybrid tower at the smallest size that keeps its shape: 3 Gated DeltaNet layers, then one gated
# full-attention layer (full_attention_interval 4, as released); rope on a quarter of each head (as released:
# partial_rotary_factor 0.25), so mrope sections sum to 32 x 0.25 / 2
QWEN3_5_TEXT = dict(num_hidden_layers=4, full_attention_interval=4, head_dim=32, linear_conv_kernel_dim=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4)
QWEN3_5_ROPE = {"mrope_section": [2, 1, 1], "mrope_interleaved": True, "partial_rotary_factor": 0.25}
# the MoE families ask for the router's auxiliary loss, so the suite trains with it
MOE_TEXT = dict(num_experts_per_tok=2, moe_intermediate_size=16, output_router_logits=True,
                router_aux_loss_coef=0.01)
SPECS = {
    "qwen3_vl": TinySpec("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", QWEN3_VISION, 8,
                         rope={"mrope_section": MROPE, "mrope_interleaved": True},
                         video_processor="Qwen3VLVideoProcessor"),
    # many small experts, so a small batch leaves some of them without tokens on a rank; not square
    # (2 x 16 != 64, 16 != 64): the experts' layout check in transformers relies on shapes
    "qwen3_vl_moe": TinySpec("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor",
                             QWEN3_VISION, 8, rope={"mrope_section": MROPE, "mrope_interleaved": True},
                             text=dict(MOE_TEXT, num_experts=64, decoder_sparse_step=1),
                             video_processor="Qwen3VLVideoProcessor"),
    "qwen2_5_vl": TinySpec("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                           # one window of 112 px (4 x 4 merged patches) and a full-attention last block
                           dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=112,
                                fullatt_block_indexes=[1]), 14, (112 * 112, 112 * 112), rope={"mrope_section": MROPE},
                           text=dict(bos_token_id=None)),
    "qwen2_vl": TinySpec("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
                         dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                              embed_dim=32, hidden_size=64, mlp_ratio=2), 14, (112 * 112, 112 * 112),  # 8 x 8 patches
                         rope={"mrope_section": MROPE}, text=dict(bos_token_id=None)),
    # a CLIP vision tower (patch 16, features of the second-to-last block), a 2-layer MLP projector, Llama
    "llava": TinySpec("LlavaConfig", "LlavaForConditionalGeneration", "LlavaProcessor",
                      dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16), 16,
                      text=dict(model_type="llama", bos_token_id=None)),
    "qwen3_5": TinySpec("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", QWEN3_5_VISION, 8,
                        rope=QWEN3_5_ROPE, text=QWEN3_5_TEXT, video_processor="Qwen3VLVideoProcessor",
                        tokenizer="Qwen3_5Tokenizer", thinking=True),
    # 32 small experts (2 a token: a small batch leaves some without tokens on a rank) and a shared one in every
    # layer, as released
    "qwen3_5_moe": TinySpec("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor",
                            QWEN3_5_VISION, 8, rope=QWEN3_5_ROPE,
                            text=dict(QWEN3_5_TEXT, **MOE_TEXT, num_experts=32, shared_expert_intermediate_size=32),
                            video_processor="Qwen3VLVideoProcessor", tokenizer="Qwen3_5Tokenizer", thinking=True),
    # SigLIP (patch 8 -> 8 x 8 patches) pooled 2 x 2 to 16 tokens; layer 0 slides over 16 tokens (shorter than a
    # sample, so the window is exercised), layer 1 is global, as in the released 5:1 pattern
    "gemma3": TinySpec("Gemma3Config", "Gemma3ForConditionalGeneration", "Gemma3Processor",
                       dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8,
                            vision_use_head=False), 8,  # as released: the projector reads the last hidden state
                       text=dict(model_type="gemma3_text", sliding_window=16, query_pre_attn_scalar=16,
                                 layer_types=["sliding_attention", "full_attention"])),
    # SigLIP tiles of 32 px (4 x 4 patches of 8); a 64 x 64 image is the base tile + the 2 x 2 grid of anyres tiles
    "llava_onevision": TinySpec("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration",
                                "LlavaOnevisionProcessor",
                                dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                                     vision_use_head=False), 8, text=dict(model_type="qwen2", bos_token_id=None)),
    # Pixtral: images keep their own size (up to 64 px), patches of 8, merged 2 x 2 by the patch merger: a 64 x 64
    # image is 4 rows of 4 [IMG] tokens, each row closed by [IMG_BREAK] (the last by [IMG_END])
    "mistral3": TinySpec("Mistral3Config", "Mistral3ForConditionalGeneration", "PixtralProcessor",
                         dict(model_type="pixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, head_dim=16, image_size=IMAGE_SIZE, patch_size=8), 8,
                         text=dict(model_type="mistral", sliding_window=None)),
    # tiles of 32 px (4 x 4 patches of 8) pixel-shuffled by 0.5 to 4 tokens; a 64 x 64 image is 2 x 2 tiles + the
    # thumbnail: 20 <IMG_CONTEXT> tokens
    "internvl": TinySpec("InternVLConfig", "InternVLForConditionalGeneration", "InternVLProcessor",
                         dict(model_type="internvl_vision", hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, image_size=[32, 32], patch_size=[8, 8]), 8,
                         text=dict(model_type="qwen2", bos_token_id=None)),
    # SmolVLM2 (Idefics3 layout): SigLIP tiles of 32 px (4 x 4 patches of 8), pixel-shuffled by 2 to 4 tokens; a
    # 64 x 64 image is a 2 x 2 grid of tiles + the global image: 20 <image> tokens
    "smolvlm": TinySpec("SmolVLMConfig", "SmolVLMForConditionalGeneration", "SmolVLMProcessor",
                        dict(model_type="smolvlm_vision", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, image_size=32, patch_size=8), 8,
                        text=dict(model_type="llama"), tokenizer="GPT2Tokenizer"),
    # Idefics3: SmolVLM's geometry here (tiles of 32 px, patches of 8, pixel-shuffled by 2): 20 <image> tokens an image
    "idefics3": TinySpec("Idefics3Config", "Idefics3ForConditionalGeneration", "Idefics3Processor",
                         dict(model_type="idefics3_vision", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8), 8,
                         text=dict(model_type="llama"), tokenizer="GPT2Tokenizer"),
    # GLM-4.6V: patches of 8 (a 64 x 64 image: 8 x 8 patches, a 2 x 2 conv to 16 tokens); GLM-4 text with its 3-d rope
    # on half of each head (as released: partial_rotary_factor 0.5, mrope_section over the rotated half)
    "glm46v": TinySpec("Glm46VConfig", "Glm46VForConditionalGeneration", "Glm46VProcessor",
                       dict(model_type="glm4v_vision", depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                            patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                            image_size=IMAGE_SIZE), 8,
                       rope={"mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5},
                       text=dict(model_type="glm4v_text", attention_bias=True), tokenizer="Qwen2Tokenizer"),
    # Gemma 4: patches of 16 pooled 2 x 2; the processor's smallest budget (70 soft tokens) resizes a 64 x 64 image to
    # 128 x 128: 8 x 8 pooled patches, 64 soft tokens; layer 0 slides over 16 tokens, layer 1 is global (as released,
    # the last is); image tokens attend both ways (use_bidirectional_attention="vision"); no audio tower
    "gemma4": TinySpec("Gemma4Config", "Gemma4ForConditionalGeneration", "Gemma4Processor",
                       dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=16, patch_size=16, pooling_kernel_size=2,
                            position_embedding_size=256), 16,
                       text=dict(model_type="gemma4_text", sliding_window=16, global_head_dim=16,
                                 layer_types=["sliding_attention", "full_attention"],
                                 use_bidirectional_attention="vision", hidden_size_per_layer_input=8)),
}
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def llava_onevision(spec: TinySpec, text: dict, tokenizer):
    """LLaVA-OneVision as llava-hf sets it up (anyres_max_9, the full feature of the last block, image newlines),
    at a tile of 32 pixels."""
    import transformers as tf

    config = tf.LlavaOnevisionConfig(text_config=text, vision_config=spec.vision,
                                     image_token_index=tokenizer.image_token_id,
                                     video_token_index=tokenizer.video_token_id,
                                     image_grid_pinpoints=ONEVISION_PINPOINTS,
                                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                                     tie_word_embeddings=True)
    image = tf.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=ONEVISION_PINPOINTS,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True)
    video = tf.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = tf.LlavaOnevisionProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                           num_image_tokens=16,
                                           vision_feature_select_strategy="full", chat_template=tokenizer.chat_template,
                                           vision_aspect_ratio="anyres_max_9")
    return config, processor


def mistral3(spec: TinySpec, text: dict, tokenizer):
    """Mistral 3 (Pixtral vision, patch merger) as released: images at their own size up to the longest edge."""
    import transformers as tf

    config = tf.Mistral3Config(text_config=dict(text, bos_token_id=tokenizer.bos_token_id), vision_config=spec.vision,
                               spatial_merge_size=2, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
                               vision_feature_layer=-1, multimodal_projector_bias=False, tie_word_embeddings=False)
    image = tf.PixtralImageProcessor(size={"longest_edge": IMAGE_SIZE}, patch_size={"height": 8, "width": 8})
    processor = tf.PixtralProcessor(image_processor=image, tokenizer=tokenizer, patch_size=8, spatial_merge_size=2,
                                    chat_template=tokenizer.chat_template)
    return config, processor


def internvl(spec: TinySpec, text: dict, tokenizer):
    """InternVL (HF layout) as OpenGVLab sets it up: crop to tiles (1 to 12) plus a thumbnail, pixel shuffle 0.5."""
    import transformers as tf

    config = tf.InternVLConfig(text_config=text, vision_config=spec.vision, downsample_ratio=0.5,
                               image_token_id=tokenizer.context_image_token_id, image_seq_length=4,
                               vision_feature_layer=-1, tie_word_embeddings=True)
    image = tf.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                     max_patches=12, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video = tf.InternVLVideoProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = tf.InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                     image_seq_length=4, chat_template=tokenizer.chat_template)
    return config, processor


def smolvlm(spec: TinySpec, text: dict, tokenizer):
    """SmolVLM2 (and Idefics3, whose layout it took over: `spec` names the classes) as HuggingFaceTB and HuggingFaceM4
    set them up: images resized (longest edge) to `size`, split into tiles of `max_image_size` plus the global image
    resized to one tile, mean/std 0.5, Lanczos, tiles zero-padded per batch (with a pixel mask); the connector
    pixel-shuffles by `scale_factor`. Released: tiles of 512 (Idefics3: 364) and a size of 4 tiles; here tiles of 32
    and a size of 2 tiles (64, the demo's images), so an image is 2 x 2 tiles + the global one. SmolVLM2's video
    processor as released reads the same settings (its `size` stands for video_sampling's video_size; every frame
    ends squared to one tile, `max_image_size`) and video_sampling's fps 1 and at most 64 frames (which ds-vlm does
    not use: it samples frames itself, --video_fps / --video_max_frames). Idefics3 has no video processor."""
    import transformers as tf

    prefix = spec.processor.removesuffix("Processor")  # SmolVLM | Idefics3
    config = getattr(tf, spec.config)(text_config=dict(text, bos_token_id=tokenizer.bos_token_id),
                                      vision_config=spec.vision, scale_factor=2,
                                      image_token_id=tokenizer.image_token_id, pad_token_id=tokenizer.pad_token_id,
                                      tie_word_embeddings=False)
    tiles = dict(size={"longest_edge": 2 * 32}, max_image_size={"longest_edge": 32}, image_mean=[0.5] * 3,
                 image_std=[0.5] * 3, resample=1)
    image = getattr(tf, f"{prefix}ImageProcessor")(do_image_splitting=True, **tiles)
    video = {}
    if prefix == "SmolVLM":
        video["video_processor"] = tf.SmolVLMVideoProcessor(**tiles, video_sampling={
            "fps": 1, "max_frames": 64, "video_size": {"longest_edge": 2 * 32}})
    processor = getattr(tf, spec.processor)(image_processor=image, tokenizer=tokenizer, image_seq_len=4,
                                            chat_template=tokenizer.chat_template, **video)
    return config, processor


def glm46v(spec: TinySpec, text: dict, tokenizer, ids: dict):
    """GLM-4.6V's config and processor as zai-org sets them (CLIP mean/std, smart resize to multiples of
    patch x merge between the pixel bounds, mm_token_type_ids), at patch 8 and the demo's image area. The video
    processor's largest area bounds a video's frames together (t x h x w), at the released ratio to the image's
    (47040000 / 9633792 = 60000 / 12288: a 64 x 64 clip keeps its size up to 4 frames); its smallest is the image's."""
    import transformers as tf

    text = {k: v for k, v in text.items() if k != "head_dim"}
    text["head_dim"] = TEXT["head_dim"]
    config = tf.Glm46VConfig(text_config=text, vision_config=spec.vision, image_token_id=ids["<|image|>"],
                             video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                             image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                             video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=False)
    bounds = {"shortest_edge": spec.pixels[0], "longest_edge": spec.pixels[1]}
    image = tf.Glm46VImageProcessor(patch_size=spec.patch, merge_size=2, temporal_patch_size=2, size=bounds)
    video = tf.Glm46VVideoProcessor(patch_size=spec.patch, merge_size=2, temporal_patch_size=2,
                                    size=dict(bounds, longest_edge=spec.pixels[1] * 60000 // 12288))
    processor = tf.Glm46VProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                   chat_template=tokenizer.chat_template)
    return config, processor


def gemma4(spec: TinySpec, text: dict, tokenizer, ids: dict):
    """Gemma 4's config (its own ropes per layer type, per-layer inputs, no audio tower) and processor as
    google/gemma-4-*-it set them (aspect-preserving resize to the soft-token budget, mean 0 / std 1), at the smallest
    budget the processor takes."""
    import transformers as tf

    text = {k: v for k, v in text.items() if k != "rope_parameters"}
    text = dict(text, bos_token_id=tokenizer.bos_token_id, vocab_size_per_layer_input=text["vocab_size"])
    config = tf.Gemma4Config(text_config=text, vision_config=spec.vision, audio_config=None,
                             boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
                             image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
                             boa_token_id=ids["<|audio>"], eoa_token_index=ids["<audio|>"],
                             audio_token_id=ids["<|audio|>"], tie_word_embeddings=True)
    budget = dict(patch_size=spec.patch, pooling_kernel_size=spec.vision["pooling_kernel_size"], max_soft_tokens=70)
    image = tf.Gemma4ImageProcessor(**budget)
    video = tf.Gemma4VideoProcessor(**budget)
    processor = tf.Gemma4Processor(feature_extractor=tf.Gemma4AudioFeatureExtractor(), image_processor=image,
                                   tokenizer=tokenizer, video_processor=video, image_seq_length=70,
                                   chat_template=tokenizer.chat_template)
    return config, processor


def gemma3(spec: TinySpec, text: dict, tokenizer, ids: dict):
    """Gemma 3's config (its own two ropes: local and global) and processor, as google/gemma-3-*-it set them:
    every image resized to the tower's size, mean/std 0.5, no pan-and-scan, <start_of_image> expanded to
    `mm_tokens_per_image` soft tokens."""
    import transformers as tf

    text = {k: v for k, v in text.items() if k != "rope_parameters"}
    config = tf.Gemma3Config(text_config=dict(text, bos_token_id=tokenizer.bos_token_id), vision_config=spec.vision,
                             mm_tokens_per_image=16, boi_token_index=ids["<start_of_image>"],
                             eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
                             tie_word_embeddings=True)
    image = tf.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, do_pan_and_scan=False)
    processor = tf.Gemma3Processor(image_processor=image, tokenizer=tokenizer, image_seq_length=16,
                                   chat_template=tokenizer.chat_template)
    return config, processor


def tiny_model(family: str, tokenizer, token_ids: dict) -> TinyModel:
    """`family`'s tiny random model around the demo tokenizer (`token_ids`: its special tokens' ids)."""
    import transformers as tf

    spec = SPECS[family]
    rope = {"rope_type": "default", "rope_theta": 10000.0, **spec.rope}
    text = dict(TEXT, vocab_size=len(tokenizer), rope_parameters=rope, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, **spec.text)
    rotary = text["head_dim"] * rope.get("partial_rotary_factor", 1.0)
    assert sum(rope.get("mrope_section", [rotary // 2])) == rotary // 2
    if family == "llava":
        image = tf.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                      crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = tf.LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=spec.patch,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=tokenizer.chat_template)
        config = tf.LlavaConfig(vision_config=spec.vision, text_config=text, image_token_index=token_ids["<image>"],
                                image_seq_length=(IMAGE_SIZE // spec.patch) ** 2, vision_feature_layer=-2,
                                vision_feature_select_strategy="default")
    elif family == "gemma3":
        config, processor = gemma3(spec, text, tokenizer, token_ids)
    elif family == "llava_onevision":
        config, processor = llava_onevision(spec, text, tokenizer)
    elif family == "mistral3":
        config, processor = mistral3(spec, text, tokenizer)
    elif family == "internvl":
        config, processor = internvl(spec, text, tokenizer)
    elif family in ("smolvlm", "idefics3"):
        config, processor = smolvlm(spec, text, tokenizer)
    elif family == "gemma4":
        config, processor = gemma4(spec, text, tokenizer, token_ids)
    elif family == "glm46v":
        config, processor = glm46v(spec, text, tokenizer, token_ids)
    else:
        processor = qwen_processor(getattr(tf, spec.processor), getattr(tf, spec.video_processor), tokenizer,
                                   spec.patch, 2, *spec.pixels)
        config = getattr(tf, spec.config)(text_config=text, vision_config=spec.vision, **qwen_token_ids(token_ids),
                                          tie_word_embeddings=True)
    return TinyModel(config, getattr(tf, spec.model), processor)


def qwen_token_ids(ids: dict) -> dict:
    """A Qwen config's vision-token ids from the tokenizer's special tokens."""
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def qwen_processor(processor_cls, video_cls, tokenizer, patch: int, merge: int, min_pixels: int, max_pixels: int,
                   **image_kwargs):
    """A Qwen-family processor around `tokenizer`: its image processor (pixel bounds), video processor."""
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                            min_pixels=min_pixels, max_pixels=max_pixels, **image_kwargs)
    video_processor = video_cls(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                         chat_template=tokenizer.chat_template)
