"""What reading a record changes in its turns before encoding, each said in the record's notes: placeholders
inserted for images kept apart from the text, LLaVA-Video's <image> read as its video, trailing turns with no
answer dropped."""

from __future__ import annotations


def insert_placeholders(messages: list[dict], images: list, newline: bool = False, only_one: bool = False) -> bool:
    """A record with images and no image placeholder: one per image at the start of the first user turn
    (`newline`: InternVL's `<image>\\n`, for a single image only with `only_one`). Whether it placed any."""
    if not images or (only_one and len(images) != 1):
        return False
    if any(part["type"] == "image" for m in messages for part in m["content"]):
        return False
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        return False
    first_user["content"][:0] = [{"type": "image"} for _ in images] + ([{"type": "text", "text": "\n"}] if newline
                                                                        else [])
    return True


def video_behind_image_placeholders(messages: list[dict], images: list, videos: list) -> list[str]:
    """LLaVA-Video's records keep a video (a file or a frame folder) under `video` while the prompt says
    `<image>`: with no image, one placeholder per video and no `<video>`, the placeholders are the videos."""
    parts = [part for m in messages for part in m["content"]]
    image_parts = [part for part in parts if part["type"] == "image"]
    if images or not videos or any(part["type"] == "video" for part in parts) or len(image_parts) != len(videos):
        return []
    for part in image_parts:
        part["type"] = "video"
    return ["<image> placeholder(s) read as the record's video(s)"]


def drop_trailing_user_turns(messages: list[dict], images: list, videos: list) -> list[str]:
    """A conversation that ends on user turns has no answer to them: they are dropped (with their images and
    videos, the last ones of the record) rather than trained on as prompt, and the record says so."""
    dropped = 0
    while messages and messages[-1]["role"] != "assistant":
        turn = messages.pop()
        dropped += 1
        for kind, refs in (("image", images), ("video", videos)):
            del refs[len(refs) - sum(part["type"] == kind for part in turn["content"]):]
    return ["trailing turn(s) after the last answer dropped"] if dropped else []
