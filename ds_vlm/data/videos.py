"""Open, sample and check videos (PyAV); failures become DataError naming the record.

A video is a file or its frames as image files (Qwen's list-of-frames form, taken as --video_fps frames a
second). Frames are sampled at --video_fps, at most --video_max_frames of them, spread evenly over the
video when it is longer; the metadata (fps, sampled frame indices) goes with them to the processor, which
writes the timestamps Qwen3-VL puts between frame groups. A family whose model takes a batch's videos as one tensor
(LLaVA-OneVision: (videos, frames, 3, H, W)) samples every video to exactly --video_max_frames frames instead
(`VideoSampling.exact`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from ds_vlm.data.formats import DataError, Sample, VideoRef


@dataclass
class VideoSampling:
    fps: float = 2.0
    max_frames: int = 32
    # every video exactly max_frames frames, spread evenly over it (fps not used; a video with fewer frames repeats
    # some): for a model whose videos in a batch must have one frame count
    exact: bool = False


def _indices(total: int, native_fps: float, sampling: VideoSampling, ref: VideoRef | None = None) -> np.ndarray:
    """Frame indices at sampling.fps (at least 2: a temporal patch), at most sampling.max_frames, even count (with
    `exact`: max_frames of them, evenly spread); within the record's `video_start`/`video_end` (seconds) and at its
    own `fps`, if it gives them."""
    first, last = 0, total - 1
    if ref is not None and native_fps:
        if ref.start is not None:
            first = int(math.floor(ref.start * native_fps))
        if ref.end is not None:
            last = min(last, int(math.ceil(ref.end * native_fps)))
    if total <= 0 or first > last:
        return np.array([], dtype=int)
    if sampling.exact:
        return np.linspace(first, last, sampling.max_frames).round().astype(int)
    span = last - first + 1
    fps = (ref.fps if ref is not None and ref.fps else 0) or sampling.fps
    wanted = int(span / max(native_fps, 1e-6) * fps) if native_fps else span
    count = max(2, min(sampling.max_frames, wanted, span))
    count -= count % 2 if count > 2 else 0
    return np.linspace(first, last, count).round().astype(int)


def _window(ref: VideoRef, total: int, fps: float) -> str:
    return (f"video_start {ref.start} s / video_end {ref.end} s leave no frame of its {total / fps:.1f} s"
            if ref.start is not None or ref.end is not None else "")


def load_video(ref: VideoRef, sample: Sample, sampling: VideoSampling):
    """(frames as a (T, H, W, 3) uint8 array, transformers' VideoMetadata)."""
    from transformers.video_utils import VideoMetadata

    def fail(kind: str, detail: str) -> DataError:
        return DataError(kind, sample.source, sample.index, detail)

    if ref.frames:
        from ds_vlm.data.formats import ImageRef
        from ds_vlm.data.images import load_image

        for frame in ref.frames:
            if not os.path.isfile(frame):
                raise fail("missing_video", f"video frame {frame} does not exist")
        rate = ref.fps or sampling.fps  # a frame list is taken as `fps` (the record's, or --video_fps) a second
        picked = _indices(len(ref.frames), rate, dataclasses.replace(sampling, fps=rate), ref)
        if not len(picked):
            raise fail("unreadable_video", f"video {ref.describe()}: {_window(ref, len(ref.frames), rate)}")
        frames = np.stack([np.asarray(load_image(ImageRef(path=ref.frames[i]), sample)) for i in picked])
        return frames, VideoMetadata(total_num_frames=len(ref.frames), fps=rate, width=frames.shape[2],
                                     height=frames.shape[1], duration=len(ref.frames) / rate,
                                     video_backend="frames", frames_indices=picked)
    if not os.path.isfile(ref.path):
        raise fail("missing_video", f"video file {ref.path} does not exist")
    try:
        picked, frames, total, fps = _decode(ref, sampling)
    except Exception as err:  # PyAV raises many types for corrupt data
        raise fail("unreadable_video", f"cannot decode video {ref.describe()}: {type(err).__name__}: "
                                       f"{str(err)[:160]}") from err
    if not frames:
        raise fail("unreadable_video", f"video {ref.describe()}: " + (_window(ref, total, fps) if total and fps
                                                                        else "has no frames" + ("" if fps else
                                                                                                " (no video stream)")))
    frames = np.stack(frames)
    return frames, VideoMetadata(total_num_frames=total, fps=fps, width=frames.shape[2], height=frames.shape[1],
                                 duration=total / fps, video_backend="pyav", frames_indices=picked)


def _decode(ref: VideoRef, sampling: VideoSampling) -> tuple[np.ndarray, list, int, float]:
    """(sampled indices, their RGB frames, frame count, native fps), holding only the sampled frames in memory. A
    container that does not state its frame count (WebM, some MKV) is counted by a first decoding pass."""
    import av

    path = ref.path
    with av.open(path) as container:
        if not container.streams.video:
            return np.array([], dtype=int), [], 0, 0.0
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or sampling.fps
        total = stream.frames or sum(1 for _ in container.decode(stream))
    picked = _indices(total, fps, sampling, ref)
    wanted, kept, decoded = set(picked.tolist()), {}, 0
    with av.open(path) as container:
        for decoded, frame in enumerate(container.decode(container.streams.video[0]), start=1):
            if decoded - 1 in wanted:
                kept[decoded - 1] = frame.to_ndarray(format="rgb24")
    if sampling.exact and kept:  # a stated count can exceed the frames there: the last one stands in for the rest
        picked = np.minimum(picked, max(kept))
    picked = np.array([i for i in picked if i in kept], dtype=int)  # (or they are left out)
    return picked, [kept[i] for i in picked], decoded, fps


def load_videos(sample: Sample, sampling: VideoSampling) -> list:
    return [load_video(ref, sample, sampling) for ref in sample.videos]
