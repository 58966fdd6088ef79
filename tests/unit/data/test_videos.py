"""Videos: frames sampled and timestamped, the peers' layouts alike, packed equal to padded, bad videos named."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from fixtures.datasets import absolute_rows, write_jsonl
from fixtures.encoding import check, video_encoder
from fixtures.numerics import assert_same, full_logits_loss_sum, loss_and_grads

from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.videos import VideoSampling

VIDEO_FAMILIES = ["qwen3_vl", "qwen2_5_vl", "qwen2_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "llava_onevision",
                  "glm46v"]


@pytest.fixture(scope="module")
def mixed(demo_dir, clips, tmp_path_factory) -> Path:
    """A video record, an image record, a text-only one, a second video: what one micro-batch may hold."""
    video, image = absolute_rows(clips / "video_train.jsonl", clips), absolute_rows(demo_dir / "data" / "train.jsonl",
                                                                     demo_dir / "data")
    text = {"conversations": [{"from": "human", "value": "Say a caption."}, image[1]["conversations"][1]]}
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", [video[0], image[0], text, video[1]])


def test_frames_are_sampled_by_fps_and_capped_and_timestamped(demo_dir, clips):
    """Qwen3-VL: a 2 s clip at --video_fps 2 is 4 frames (2 groups of 2), at 4 fps 8 frames (4 groups), capped
    to 4 by --video_max_frames; each group gets its `<t seconds>` and its frames' tokens; the list-of-frames form
    reads the same clip's frames as images."""
    records = RecordIndex([str(clips / "video_train.jsonl")])
    sample = records.sample(0)

    def encoded(sampling: VideoSampling):
        encoder = video_encoder(demo_dir / "model", "qwen3_vl", sampling)
        out = encoder.encode(sample, *encoder.media(sample))
        text = encoder.tokenizer.decode(out["input_ids"][0])
        return out, text, encoder

    for sampling, groups in ((VideoSampling(2.0, 32), 2), (VideoSampling(4.0, 32), 4), (VideoSampling(4.0, 4), 2)):
        out, text, encoder = encoded(sampling)
        t, h, w = out["video_grid_thw"][0].tolist()
        merge = encoder.processor.video_processor.merge_size
        video_id = encoder.tokenizer.convert_tokens_to_ids(encoder.video_token)
        assert t == groups and text.count(" seconds>") == groups, (sampling, text)
        assert int((out["input_ids"] == video_id).sum()) == t * h * w // merge ** 2
        assert out["pixel_values_videos"].shape[0] == t * h * w and (out["labels"][0] != -100).any()
        assert "moving" in encoder.tokenizer.decode(out["input_ids"][0][out["labels"][0] != -100])


def test_peer_video_layouts_give_the_same_tensors(demo_dir, clips, tmp_path):
    """LLaMA-Factory's `videos` + `<video>`, Qwen's `video` key, OpenAI-style parts, and the clip as a list of frame
    files (Qwen's form), all the same clip: the same token ids; the frame files also the same pixels."""
    import av
    from PIL import Image

    row = absolute_rows(clips / "video_train.jsonl", clips)[0]
    path, question, answer = row["videos"][0], row["conversations"][0]["value"], row["conversations"][1]["value"]
    frames = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frames.append(str(tmp_path / f"frame_{i}.png"))
            frame.to_image().save(frames[-1])
    layouts = [
        row,
        {"video": path, "conversations": row["conversations"]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": path},
                                                   {"type": "text", "text": question.replace("<video>", "")}]},
                      {"role": "assistant", "content": [{"type": "text", "text": answer}]}]},
    ]
    data = write_jsonl(tmp_path / "layouts.jsonl", layouts + [{**row, "videos": [frames]}])
    encoder = video_encoder(demo_dir / "model", "qwen3_vl", VideoSampling(4.0, 32))  # every frame of the 4 fps clip
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    items = [dataset[i] for i in range(4)]
    for item in items[1:]:
        assert torch.equal(item["input_ids"], items[0]["input_ids"]) and torch.equal(item["labels"], items[0]["labels"])
    for item in items[1:3]:
        assert torch.equal(item["pixel_values_videos"], items[0]["pixel_values_videos"])
    assert items[3]["video_grid_thw"].tolist() == items[0]["video_grid_thw"].tolist()
    assert len(frames) == 8 and Image.open(frames[0]).size == (64, 64)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_packed_equals_padded_and_text_only_batches_run_the_video_path(family, family_models, mixed):
    """fp32 loss and every gradient: [video, image, text-only, video] padded vs packed (each sample's own rope
    positions, Qwen2.5-VL's seconds per grid included; where a family refuses packing: padded vs each sample
    alone); then two text-only samples: the dummy image and the dummy video leave the loss as it is and put
    gradients on the vision tower (GLM-4.6V: the dummy video's frames go in with the image, one call, glm46v.py)."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models.base import set_use_cache

    model_dir = family_models(family)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    set_use_cache(model.config, False)
    model.train()
    encoder = video_encoder(model_dir, family)
    dataset = SFTDataset(RecordIndex([str(mixed)]), encoder)
    samples = [dataset[i] for i in range(4)]
    assert "pixel_values_videos" in samples[0] and "pixel_values" in samples[1] and "pixel_values" not in samples[2]
    pad_id, dummy, dummy_video = encoder.tokenizer.pad_token_id, encoder.dummy(), encoder.dummy_video()
    model_inputs = encoder.adapter.model_inputs
    padded = Collator(pad_id, dummy, dummy_video=dummy_video, model_inputs=model_inputs)
    packed = Collator(pad_id, dummy, encoder.adapter.position_ids(model.config), dummy_video=dummy_video,
                      packing=True, model_inputs=model_inputs)
    frames_as_images = encoder.video_token_id == encoder.image_token_id  # GLM-4.6V
    if not encoder.adapter.packing_refusal(model.config):
        reference, got = loss_and_grads(model, padded(samples)), loss_and_grads(model, packed(samples))
        assert_same(got, reference)
        assert got[2].computed == got[2].tokens  # video and image present: nothing added
    else:
        packed = None
        alone = sum(loss_and_grads(model, padded([sample]))[0] for sample in samples)
        torch.testing.assert_close(loss_and_grads(model, padded(samples))[0], alone, rtol=1e-5, atol=0)

    text_only = [samples[2], samples[2]]
    calls = []
    vision = encoder.adapter.parts(model).vision_blocks[0]
    hook = vision.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    without_video = loss_and_grads(model, Collator(pad_id, dummy)(text_only))
    assert len(calls) == 1  # the dummy image only
    for collator in (padded, packed) if packed else (padded,):
        calls.clear()
        micro = collator(text_only)
        assert ("pixel_values_videos" in micro.inputs) != frames_as_images and "pixel_values" in micro.inputs
        loss, grads, _ = loss_and_grads(model, micro)
        torch.testing.assert_close(loss, without_video[0], rtol=1e-5, atol=0)
        assert any(p.grad is not None for p in vision.parameters())
        if frames_as_images:  # the image's and the video's patch rows in one call
            assert calls == [dummy["pixel_values"].shape[0] + dummy_video["pixel_values_videos"].shape[0]]
        else:
            assert len(calls) == 2  # image, then video
    hook.remove()


def test_llava_onevision_videos_are_pooled_frames_of_one_count_and_train_packed_as_padded(family_models, clips,
                                                                                       demo_dir, tmp_path):
    """LLaVA-OneVision: every video is sampled to exactly --video_max_frames frames (the 2 s clip at 2 fps would be 4
    frames; a 3-frame list is spread to 6 too), so that videos of different lengths batch as one tensor; its <video>
    tokens are frames x the 2 x 2-pooled patch grid + the newline, counted here from the model config, whatever the
    video's aspect ratio (a frame is resized to the tower's tile; an image's count follows its aspect ratio). [video,
    short video, image, text] padded == packed (fp32 loss and every gradient), and the trainer's loss equals the
    full-logits loss; FLOPs count every frame. Frames not at the tower's size are refused by name (the processor
    would place a token count they do not fill), and so is --video_max_pixels."""
    import av
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.config import ModelConfig
    from ds_vlm.data.formats import DataError
    from ds_vlm.data.pixels import set_video_pixel_bounds
    from ds_vlm.models.base import set_use_cache
    from ds_vlm.runtime.flops import FlopsCounter

    model_dir = family_models("llava_onevision")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    set_use_cache(model.config, False)
    model.train()
    vision = model.config.vision_config
    pooled = math.ceil(vision.image_size // vision.patch_size / 2) ** 2  # a 32-pixel frame: 4 x 4 patches -> 2 x 2

    video = absolute_rows(clips / "video_train.jsonl", clips)[0]
    frames = []
    with av.open(video["videos"][0]) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i < 3:
                frames.append(str(tmp_path / f"frame_{i}.png"))
                frame.to_image().crop((0, 0, 64, 40)).save(frames[-1])  # wider than high: still a 32 x 32 frame
    image = absolute_rows(demo_dir / "data" / "train.jsonl", demo_dir / "data")[0]
    text = {"conversations": [{"from": "human", "value": "Say a caption."}, image["conversations"][1]]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [video, {**video, "videos": [frames]}, image, text])
    encoder = video_encoder(model_dir, "llava_onevision", VideoSampling(2.0, 6))
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    samples = [dataset[i] for i in range(4)]
    video_id = encoder.tokenizer.convert_tokens_to_ids("<video>")
    for sample in samples[:2]:
        assert sample["pixel_values_videos"].shape == (1, 6, 3, vision.image_size, vision.image_size)
        assert int((sample["input_ids"] == video_id).sum()) == 6 * pooled + 1
    assert "pixel_values_videos" not in samples[2] and "pixel_values" in samples[2]

    pad_id = encoder.tokenizer.pad_token_id
    padded = Collator(pad_id, encoder.dummy(), dummy_video=encoder.dummy_video())
    packed = Collator(pad_id, encoder.dummy(), encoder.adapter.position_ids(model.config),
                      dummy_video=encoder.dummy_video(), packing=True)
    reference, got = loss_and_grads(model, padded(samples)), loss_and_grads(model, packed(samples))
    assert_same(got, reference)
    micro = reference[2]
    assert micro.inputs["pixel_values_videos"].shape[:2] == (2, 6) and micro.computed > micro.tokens  # padding
    with torch.no_grad():
        full = full_logits_loss_sum(model(**micro.inputs).logits, micro.labels)
    torch.testing.assert_close(reference[0], full, rtol=1e-5, atol=0)
    # FLOPs: the image's tiles (its base tile and anyres grid), then the 12 frames, each a tile's patches
    per_tile, tiles = (vision.image_size // vision.patch_size) ** 2, micro.inputs["pixel_values"].shape[1]
    assert encoder.adapter.patches_per_image(micro.inputs, model.config) == [per_tile] * (tiles + 2 * 6)
    counter = FlopsCounter(model, encoder.adapter, ModelConfig())
    assert counter(micro.inputs, micro.targets, micro.sample_lengths) == counter(
        got[2].inputs, got[2].targets, got[2].sample_lengths)

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.video_processor.size = {"height": 48, "width": 48}  # 6 x 6 patches a frame: not the tower's 4 x 4
    sample = RecordIndex([str(data)]).sample(0)
    wrong = video_encoder(model_dir, "llava_onevision", VideoSampling(2.0, 4))
    wrong.processor = processor
    with pytest.raises(DataError, match=f"{4 * pooled + 1} video token.* fill {4 * 9 + 1}"):
        wrong.encode(sample, *wrong.media(sample))
    with pytest.raises(ValueError, match="--video_max_pixels: LlavaOnevisionVideoProcessor resizes every frame to 32"):
        set_video_pixel_bounds(AutoProcessor.from_pretrained(model_dir), 64 * 64)


def test_glm_videos_are_timestamped_frame_pairs_filling_image_tokens_and_train_packed_as_padded(family_models, clips,
                                                                                                  demo_dir, tmp_path,
                                                                                                  monkeypatch):
    """GLM-4.6V: a video is written as its frame pairs, each `<|begin_of_image|>` + h w / merge^2 <|image|> +
    `<|end_of_image|>` + its first frame's second (`1.2 seconds`), inside <|begin_of_video|> ... <|end_of_video|>; the
    count is computed here from the sampled frames, the tower's patch and merge sizes, and the video processor's budget
    over all frames. Its forward cannot take an image and a video together (tried: it fails), so the collator hands it
    the frame pairs as images: for a video alone that gives the model's own logits (its video path, its rope index),
    and the model's rope index on the merged tensors gives the host positions. [video, image, text, image + video]
    padded == packed (fp32 loss and every gradient), the device-side rope index never called; the trainer's loss equals
    the full-logits loss; FLOPs count every frame pair. A record whose ids hold other than its frames' token count is
    refused by name."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import BatchConfig, ModelConfig
    from ds_vlm.data.formats import DataError
    from ds_vlm.models.base import set_use_cache
    from ds_vlm.runtime.flops import FlopsCounter

    model_dir = family_models("glm46v")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    set_use_cache(model.config, False)
    model.train()
    patch, merge = model.config.vision_config.patch_size, model.config.vision_config.spatial_merge_size
    video = absolute_rows(clips / "video_train.jsonl", clips)[0]
    image = absolute_rows(demo_dir / "data" / "train.jsonl", demo_dir / "data")[0]
    text = {"conversations": [{"from": "human", "value": "Say a caption."}, image["conversations"][1]]}
    both = {"conversations": [{"from": "human", "value": "<image>First this, then <video>where does it go?"},
                              video["conversations"][1]], "images": image["images"], "videos": video["videos"]}
    data = write_jsonl(tmp_path / "glm_mixed.jsonl", [video, image, text, both])
    records = RecordIndex([str(data)])

    # the 2 s clip at 4 fps: 2 fps samples frames 0, 2, 5, 7 (2 pairs, at 0.0 s and 1.25 s); 4 fps all 8 (4 pairs),
    # which the budget of 20000 pixels over all frames shrinks from 64 to 48 pixels a side (8 x 64^2 > 20000)
    for sampling, seconds, side in ((VideoSampling(2.0, 32), ["0.0", "1.2"], 64),
                                    (VideoSampling(4.0, 32), ["0.0", "0.5", "1.0", "1.5"], 48)):
        encoder = video_encoder(model_dir, "glm46v", sampling)
        sample = records.sample(0)
        images, videos = encoder.media(sample)
        frames, _ = videos[0]
        assert frames.shape[0] == 2 * len(seconds) and frames.shape[1:3] == (64, 64)
        out = encoder.encode(sample, images, videos)
        per_pair = (side // patch // merge) ** 2
        frame = "<|begin_of_image|>" + "<|image|>" * per_pair + "<|end_of_image|>"
        written = "<|begin_of_video|>" + "".join(f"{frame}{s} seconds" for s in seconds) + "<|end_of_video|>"
        decoded = encoder.tokenizer.decode(out["input_ids"][0])
        assert written in decoded and "<|video|>" not in decoded, decoded
        image_id = encoder.tokenizer.convert_tokens_to_ids("<|image|>")
        assert int((out["input_ids"] == image_id).sum()) == len(seconds) * per_pair
        assert int((out["mm_token_type_ids"] == 2).sum()) == len(seconds) * per_pair
        assert out["video_grid_thw"].tolist() == [[len(seconds), side // patch, side // patch]]
        assert encoder.media_tokens(out) == {"image": 0, "video": len(seconds) * per_pair}

    encoder = video_encoder(model_dir, "glm46v")
    adapter = encoder.adapter
    dataset = SFTDataset(records, encoder)
    samples = [dataset[i] for i in range(4)]
    # a 64 x 64 image is resized to 32 x 32 (GLM's image budget, 4096 here, counts its 2 temporal copies): 4 tokens
    assert encoder.media_tokens(samples[3]) == {"image": 4, "video": 32}
    positions = adapter.position_ids(model.config)
    pad_id, dummy, dummy_video = encoder.tokenizer.pad_token_id, encoder.dummy(), encoder.dummy_video()
    padded = Collator(pad_id, dummy, positions, dummy_video=dummy_video, model_inputs=adapter.model_inputs)
    packed = Collator.for_run(encoder, adapter, model.config, BatchConfig(packing=True), 1)  # as the trainer's

    # the model's own forward with an image and a video fails; a video alone it takes, and gets what the merge gives
    raw = Collator(pad_id, dummy, dummy_video=dummy_video)(samples)
    with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**raw.inputs)
    alone = {k: v for k, v in samples[0].items() if k not in ("labels", "record")}
    merged = adapter.model_inputs(dict(alone, position_ids=positions(alone)))
    assert "pixel_values_videos" not in merged and merged["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    own_positions, _ = model.model.get_rope_index(merged["input_ids"], merged["mm_token_type_ids"],
                                                  merged["image_grid_thw"])
    assert torch.equal(own_positions, positions(alone)[1:])
    with torch.no_grad():
        torch.testing.assert_close(model(**merged).logits, model(**alone).logits, rtol=1e-5, atol=1e-5)

    batches = padded(samples), packed(samples)
    with monkeypatch.context() as patch_:
        patch_.setattr(type(model.model), "get_rope_index",
                       lambda *a, **k: pytest.fail("the rope index was computed in the forward"))
        reference, got = (loss_and_grads(model, micro) for micro in batches)
        assert_same(got, reference)
        micro = reference[2]
        with torch.no_grad():
            full = full_logits_loss_sum(model(**micro.inputs).logits, micro.labels)
    torch.testing.assert_close(reference[0], full, rtol=1e-5, atol=0)
    assert got[2].computed == got[2].tokens and micro.computed > micro.tokens  # packed: nothing added; padded: padding
    # the pixels in token order: the first video's 2 pairs, the image, the last record's image, then its video's pairs
    order = torch.cat([samples[0]["pixel_values_videos"], samples[1]["pixel_values"], samples[3]["pixel_values"],
                       samples[3]["pixel_values_videos"]])
    assert torch.equal(micro.inputs["pixel_values"], order) and torch.equal(got[2].inputs["pixel_values"], order)
    # FLOPs: every frame pair (8 x 8 patches at 64 pixels) and image (4 x 4), as the unmerged tensors count them
    assert adapter.patches_per_image(micro.inputs, model.config) == [64, 64, 16, 16, 64, 64]
    assert sorted(adapter.patches_per_image(raw.inputs, model.config)) == [16, 16, 64, 64, 64, 64]
    counter = FlopsCounter(model, adapter, ModelConfig())
    assert counter(micro.inputs, micro.targets, micro.sample_lengths) == counter(
        got[2].inputs, got[2].targets, got[2].sample_lengths)

    # generation (the evaluations) gets the merged tensors too: a prompt with an image and a video beside one with an
    # image, left-padded, positions from the model's own rope index
    from ds_vlm.eval.generation import generate_answers, prompt_batch

    prompts = [records.sample(3), records.sample(1)]
    assert "pixel_values_videos" not in prompt_batch(encoder, prompts)
    assert len(generate_answers(model, encoder.processor, prompts, max_new_tokens=2)) == 2

    # a processor that writes a frame's tokens one short: refused by name, not failed in the forward
    write = encoder.processor.replace_frame_token_id
    monkeypatch.setattr(encoder.processor, "replace_frame_token_id",
                        lambda second, num_image_tokens=1: write(second, num_image_tokens - 1))
    sample = records.sample(0)
    with pytest.raises(DataError, match="30 video token.* fill 32"):
        encoder.encode(sample, *encoder.media(sample))


def test_bad_videos_are_named_and_llava_refuses_video(demo_dir, clips, family_models, tmp_path):
    """A missing file, a corrupt one, one with no frames, a missing frame file: each a DataError of its kind naming
    the file and record; a sample with video is never truncated; LLaVA has no video path and says so."""
    import av

    good = absolute_rows(clips / "video_train.jsonl", clips)[0]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(random.Random(0).randrange(256) for _ in range(4000)))
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as container:  # a header, no frame
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    rows = [good] + [{**good, "videos": [v]} for v in (str(tmp_path / "nowhere.mp4"), str(corrupt), str(empty),
                                                       [str(tmp_path / "f0.png"), str(tmp_path / "f1.png")])]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    checks = check(RecordIndex([str(data)]), video_encoder(demo_dir / "model", "qwen3_vl"))
    assert [c.kind for c in checks] == ["ok", "missing_video", "unreadable_video", "unreadable_video",
                                        "missing_video"], [c.message for c in checks]
    for one, name in zip(checks[1:], ("nowhere.mp4", "corrupt.mp4", "empty.mp4", "f0.png")):
        assert f"{data} record {one.index}" in one.message and name in one.message, one.message
    assert "has no frames" in checks[3].message
    assert checks[0].n_video_tokens > 0 and checks[0].n_tokens > checks[0].n_video_tokens

    short = check(RecordIndex([str(data)]), video_encoder(demo_dir / "model", "qwen3_vl", max_length=20,
                                                     truncation="truncate"), [0])
    assert short[0].kind == "too_long" and "never truncated" in short[0].message

    llava = check(RecordIndex([str(data)]), video_encoder(family_models("llava"), "llava"), [0])
    assert llava[0].kind == "unsupported_media" and "llava" in llava[0].message and "record 0" in llava[0].message


def test_smolvlm_video_frames_are_timestamped_global_images_in_token_order_and_train_packed_as_padded(
        family_models, clips, demo_dir, tmp_path):
    """SmolVLM2: <video> becomes the preamble ("... four frames from a 0:00:02 [H:MM:SS] video.") and per frame a
    "Frame from MM:SS:" line and one global image (no tiles); the frames go into pixel_values like images, so a
    sample's <image> tokens are (frames + image tiles) x image_seq_len, counted here from the model config. In one turn
    [video, image, text], the processor alone would leave the image's tiles out (its video output replaces its image
    output by key) and the encoder refuses that by its token count; the adapter puts the frames then the tiles, as the
    tokens come. [video, video + image, image, text, video] padded == packed (fp32 loss and every gradient), the
    trainer's loss == the full-logits loss, FLOPs count every frame as a tile; no dummy video (a text-only micro-batch
    runs the vision tower once, on the dummy image); never truncated; --video_max_pixels refused (every frame ends
    squared to one tile); a video prompt and an image prompt generate in one batch; Idefics3 (no video processor)
    refuses video."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.config import BatchConfig, ModelConfig
    from ds_vlm.data.formats import DataError
    from ds_vlm.data.pixels import set_video_pixel_bounds
    from ds_vlm.data.preflight import Checks
    from ds_vlm.eval.generation import generate_answers
    from ds_vlm.models.base import Adapter, set_use_cache
    from ds_vlm.models.smolvlm import SmolVLMAdapter, real_tiles
    from ds_vlm.runtime.flops import FlopsCounter

    model_dir = family_models("smolvlm")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    set_use_cache(model.config, False)
    model.train()
    vision = model.config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2  # 4 x 4 patches of a 32-pixel tile
    seq_len = per_tile // model.config.scale_factor ** 2      # pixel-shuffled by 2: 4 <image> tokens a tile
    frames, tiles = 4, 2 * 2 + 1  # the 2 s clip at 2 fps; a 64 x 64 image: 2 x 2 tiles + the global image

    video, other = absolute_rows(clips / "video_train.jsonl", clips)[:2]
    image = absolute_rows(demo_dir / "data" / "train.jsonl", demo_dir / "data")[0]
    both = {"conversations": [{"from": "human", "value": "<video><image>Where does it move?"},
                              video["conversations"][1]], "videos": video["videos"], "images": image["images"]}
    text = {"conversations": [{"from": "human", "value": "Say a caption."}, image["conversations"][1]]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [video, both, image, text, other])
    encoder = video_encoder(model_dir, "smolvlm", VideoSampling(2.0, 32))
    assert encoder.video_token_id is None  # nothing fills <video> in the ids: its frames are images
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    samples = [dataset[i] for i in range(5)]
    tokenizer, image_id = encoder.tokenizer, encoder.tokenizer.convert_tokens_to_ids("<image>")
    for sample, n_tiles in zip(samples, (frames, frames + tiles, tiles, 0, frames)):
        assert int((sample["input_ids"] == image_id).sum()) == n_tiles * seq_len
        assert "pixel_values_videos" not in sample
        assert (real_tiles(sample)[0].shape[0] if n_tiles else 0) == n_tiles
    decoded = tokenizer.decode(samples[0]["input_ids"][0])
    assert "You are provided the following series of four frames from a 0:00:02 [H:MM:SS] video.\n" in decoded
    # frames 0, 2, 5, 7 of 8 at 4 fps: 0, 0.5, 1.25 and 1.75 s
    assert decoded.count("\nFrame from 00:00:<fake_token_around_image><global-img>") == 2, decoded
    assert decoded.count("\nFrame from 00:01:<fake_token_around_image><global-img>") == 2, decoded
    assert decoded.count("<global-img>") == frames and "<row_1_col_1>" not in decoded
    # [video, image] in one turn: the frames, then the image's tiles, as their tokens come
    torch.testing.assert_close(real_tiles(samples[1])[0],
                               torch.cat([real_tiles(samples[0])[0], real_tiles(samples[2])[0]]), rtol=0, atol=0)
    ids = samples[1]["input_ids"][0].tolist()
    globals_ = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<global-img>")]
    first_tile = ids.index(tokenizer.convert_tokens_to_ids("<row_1_col_1>"))
    assert len(globals_) == frames + 1 and globals_[frames - 1] < first_tile < globals_[frames]

    class ProcessorAlone(SmolVLMAdapter):  # the processor's own call, as without the adapter's process
        process = Adapter.process

    plain = video_encoder(model_dir, "smolvlm", VideoSampling(2.0, 32))
    plain.adapter = ProcessorAlone()
    sample = RecordIndex([str(data)]).sample(1)
    with pytest.raises(DataError, match=f"{(frames + tiles) * seq_len} image token.* fill {frames * seq_len}"):
        plain.encode(sample, *plain.media(sample))
    short = check(RecordIndex([str(data)]), video_encoder(model_dir, "smolvlm", max_length=30, truncation="truncate"),
                  [0])
    assert short[0].kind == "too_long" and "never truncated" in short[0].message

    pad_id, dummy = tokenizer.pad_token_id, encoder.dummy()
    padded = Collator(pad_id, dummy)
    packed = Collator(pad_id, dummy, encoder.adapter.position_ids(model.config), packing=True)
    reference, got = loss_and_grads(model, padded(samples)), loss_and_grads(model, packed(samples))
    assert_same(got, reference)
    micro = reference[2]
    assert micro.computed > micro.tokens  # padding
    with torch.no_grad():
        full = full_logits_loss_sum(model(**micro.inputs).logits, micro.labels)
    torch.testing.assert_close(reference[0], full, rtol=1e-5, atol=0)
    n_tiles = 3 * frames + 2 * tiles
    assert encoder.adapter.patches_per_image(micro.inputs, model.config) == [per_tile] * n_tiles
    counter = FlopsCounter(model, encoder.adapter, ModelConfig())
    assert counter(micro.inputs, micro.targets, micro.sample_lengths) == counter(
        got[2].inputs, got[2].targets, got[2].sample_lengths)

    calls = []
    hook = encoder.adapter.parts(model).vision_blocks[0].register_forward_hook(lambda *_: calls.append(1))
    unchecked = SFTDataset(RecordIndex([str(data)]), encoder, skip_bad=True, checks=Checks.unchecked(0, 5))
    for collator in (padded, packed):  # --preflight off: any record may have a video, and still no dummy video
        calls.clear()
        assert Collator.for_run(encoder, encoder.adapter, model.config, BatchConfig(packing=collator is packed), 1,
                                [unchecked]).dummy_video is None
        micro = collator([samples[3], samples[3]])
        assert "pixel_values" in micro.inputs and "pixel_values_videos" not in micro.inputs
        loss_and_grads(model, micro)
        assert len(calls) == 1  # the vision tower once, on the dummy image
    hook.remove()

    with pytest.raises(ValueError, match="--video_max_pixels: SmolVLMVideoProcessor's size .* bounds a frame's edge"):
        set_video_pixel_bounds(AutoProcessor.from_pretrained(model_dir), 64 * 64)

    records = RecordIndex([str(data)])  # greedy answers to a video prompt and an image prompt (4 and 5 tiles) at once
    assert len(generate_answers(model, AutoProcessor.from_pretrained(model_dir), [records.sample(0),
                                                                                  records.sample(2)],
                                max_new_tokens=2)) == 2

    idefics3 = check(RecordIndex([str(data)]), video_encoder(family_models("idefics3"), "idefics3"), [0])
    assert idefics3[0].kind == "unsupported_media" and "the idefics3 family has no video path" in idefics3[0].message
