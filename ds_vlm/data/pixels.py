"""The processor's pixel bounds from the run's flags (--min_pixels, --max_pixels, --video_max_pixels): set where the
processor has area bounds (Qwen's shortest_edge / longest_edge, in pixels), refused by name where it has none."""

from __future__ import annotations


def _size(processor_part) -> dict:
    """An image or video processor's `size` as a dict of the keys it sets (it is a dict or transformers' SizeDict;
    an older processor's plain number sets none of them)."""
    size = getattr(processor_part, "size", None)
    return dict(size) if hasattr(size, "get") else {}


def pixel_bounds(image_processor) -> dict:
    """The image processor's {shortest_edge, longest_edge}: Qwen's smallest and largest image areas in pixels
    (None where it resizes every image to a fixed size); its `size` is a dict or transformers' SizeDict."""
    size = _size(image_processor)
    return {k: size.get(k) for k in ("shortest_edge", "longest_edge")}


def set_pixel_bounds(processor, min_pixels: int, max_pixels: int) -> None:
    """Apply --min_pixels / --max_pixels to the image processor, or refuse if it has no such bounds."""
    if not (min_pixels or max_pixels):
        return
    image_processor = processor.image_processor
    bounds = pixel_bounds(image_processor)
    if None in bounds.values():
        raise ValueError(f"--min_pixels/--max_pixels: {type(image_processor).__name__} resizes every image to a "
                         "fixed size; it has no pixel bounds to set")
    new = {"shortest_edge": min_pixels or bounds["shortest_edge"], "longest_edge": max_pixels or bounds["longest_edge"]}
    if new["shortest_edge"] > new["longest_edge"]:
        raise ValueError(f"--min_pixels {new['shortest_edge']} > --max_pixels {new['longest_edge']}")
    image_processor.size = new


def set_video_pixel_bounds(processor, max_pixels: int) -> None:
    """Apply --video_max_pixels to the video processor's frames, or refuse if it resizes every frame to one size."""
    video_processor = getattr(processor, "video_processor", None)
    if not max_pixels or video_processor is None:
        return
    size = _size(video_processor)
    # LLaVA-OneVision: frames at the vision tower's size, which its pooling assumes
    if size.get("height") and size.get("width"):
        raise ValueError(f"--video_max_pixels: {type(video_processor).__name__} resizes every frame to "
                         f"{size['height']} x {size['width']}; it has no pixel bounds to set")
    shortest = size.get("shortest_edge")
    if not shortest:  # SmolVLM: `longest_edge` is an edge in pixels, and every frame is then squared to one tile
        raise ValueError(f"--video_max_pixels: {type(video_processor).__name__}'s size ({size}) bounds a "
                         "frame's edge, not its area (shortest_edge, longest_edge); it has no pixel bounds to set")
    video_processor.size = {"shortest_edge": min(shortest, max_pixels), "longest_edge": max_pixels}
