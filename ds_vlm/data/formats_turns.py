"""A record's turns -> messages of typed parts, for every layout: the chat layouts (sharegpt, messages, Mantis'
`conversation`, typed OpenAI parts), Gemini's `contents`/`parts`, Bedrock Converse's content blocks, TRL's
prompt/completion, the Cauldron's pairs, ms-swift's and alpaca's query/response, and caption pairs. Used by
formats._Reader, whose `bad(kind, detail)` makes the record's DataError."""

from __future__ import annotations

import re

from ds_vlm.data.formats_media import IMAGE_OPTIONS, VIDEO_OPTIONS, MediaReader
from ds_vlm.data.sample import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from ds_vlm.data.tool_use import tool_calls

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "model": "assistant", "observation": "tool", "tool": "tool",
              "function_call": "assistant"}
TURN_KEYS = {"from", "role", "value", "content", "loss", "tool_calls", "tool_call_id"}
PART_KEYS = {"type", "text", "value", "image", "image_url", "url", "path", "video", "video_url",
             *IMAGE_OPTIONS, *VIDEO_OPTIONS}
MEDIA_VALUE_KEYS = {"url", "path", "bytes"}  # read inside a part's {"url": ...} value; others are reported
NUMBERED = "numbered placeholders <image N> read as the images they number"
_PLACEHOLDERS = re.compile(rf"({IMAGE_PLACEHOLDER}|{VIDEO_PLACEHOLDER}|{AUDIO_PLACEHOLDER}|<image \d+>)")
_GEMINI_MEDIA = {"inlineData": "inline", "inline_data": "inline", "fileData": "file", "file_data": "file"}


class TurnReader(MediaReader):
    """Needs what MediaReader needs, `ignored` (a set of reported keys), `inline_images`/`inline_videos`."""

    def layout_turns(self, record: dict, layout: str) -> list[dict]:
        if layout == "prompt_completion":  # TRL: the prompt (any turns) masked, the completion learned
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            if not (isinstance(prompt, list) and isinstance(completion, list) and completion):
                raise self.bad("bad_record", "'prompt' and 'completion' must both be text or both lists of messages")
            masked = [{**t, "loss": False} if isinstance(t, dict) and t.get("role") == "assistant" else t
                      for t in prompt]
            return [*masked, *completion]
        if layout == "cauldron":
            return self._cauldron(record["texts"])
        if layout in ("sharegpt", "llava", "messages", "openai", "mantis", "bedrock", "gemini"):
            key = {"sharegpt": "conversations", "llava": "conversations", "mantis": "conversation",
                   "gemini": "contents"}.get(layout, "messages")
            turns = record[key]
            if not isinstance(turns, list) or not turns:
                raise self.bad("bad_record", f"'{key}' is not a non-empty list of turns")
            if layout == "gemini":
                return [self._gemini_turn(turn, number) for number, turn in enumerate(turns)]
            if layout == "bedrock":
                return [self._bedrock_turn(turn, number) for number, turn in enumerate(turns)]
            return turns
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            raise self.bad("bad_record", "'history' must be a list of [query, response] pairs")
        if layout == "swift":
            query, response = record.get("query"), record.get("response")
        else:  # alpaca: the instruction, then the input on its own line (LLaMA-Factory's joining)
            query = "\n".join(str(x) for x in (record.get("instruction"), record.get("input")) if x)
            response = record.get("output")
        pairs = [*history, (query, response)]
        return [{"role": role, "content": text} for q, r in pairs for role, text in (("user", q), ("assistant", r))]

    def _cauldron(self, texts) -> list[dict]:
        turns = []
        for number, pair in enumerate(texts):
            if not isinstance(pair, dict) or not {"user", "assistant"} <= set(pair):
                raise self.bad("bad_record", f"texts[{number}] is not a {{user, assistant}} pair")
            self.ignored.update(f"texts.{key}" for key in pair if key not in ("user", "assistant"))
            turns += [{"role": "user", "content": pair["user"]}, {"role": "assistant", "content": pair["assistant"]}]
        if not turns:
            raise self.bad("bad_record", "'texts' holds no {user, assistant} pair")
        return turns

    # -- Gemini and Bedrock: their parts as typed parts --------------------------------------------
    def _gemini_turn(self, turn, number: int) -> dict:
        if not isinstance(turn, dict) or not isinstance(turn.get("parts"), list):
            raise self.bad("bad_record", f"contents[{number}] is not a {{role, parts: [...]}} object")
        self.ignored.update(f"turn.{key}" for key in turn if key not in ("role", "parts"))
        return {"role": turn.get("role", "user"), "content": [self._gemini_part(p, f"contents[{number}]")
                                                              for p in turn["parts"]]}

    def gemini_system(self, value) -> str:
        parts = value.get("parts") if isinstance(value, dict) else None
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                  for p in parts):
            raise self.bad("bad_record", "'systemInstruction' is not {parts: [{text: ...}]}")
        return "".join(p["text"] for p in parts)

    def _gemini_part(self, part, where: str) -> dict:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            self._report("part", part, {"text"})
            return {"type": "text", "text": part["text"]}
        kind = next((k for k in _GEMINI_MEDIA if isinstance(part, dict) and k in part), None)
        if kind is None or not isinstance(part[kind], dict):
            raise self.bad("bad_record", f"{where}: a Gemini part that is neither text, inlineData nor fileData: "
                                         f"{str(part)[:80]}")
        media = part[kind]
        self._report("part", part, {kind, "videoMetadata", "video_metadata"})
        self._report(f"part.{kind}", media, {"mimeType", "mime_type", "data", "fileUri", "file_uri"})
        mime = str(media.get("mimeType", media.get("mime_type", "")))
        if not mime.startswith(("image/", "video/")):
            raise self.bad("unsupported_media", f"{where}: a {mime or 'untyped'} part; images and videos are read")
        kind_name = mime.split("/")[0]
        if _GEMINI_MEDIA[kind] == "inline":
            value = f"data:{mime};base64,{media.get('data', '')}"
            if kind_name == "video":
                raise self.bad("unsupported_media", f"{where}: an inline (base64) video; give it as a file")
        else:
            value = media.get("fileUri", media.get("file_uri"))
        return {"type": kind_name, kind_name: value, **self._gemini_clip(part, kind_name, where)}

    def _gemini_clip(self, part: dict, kind: str, where: str) -> dict:
        """A video part's `videoMetadata` ({startOffset, endOffset: "1.5s", fps}) as the part's own sampling."""
        meta = part.get("videoMetadata", part.get("video_metadata"))
        if meta is None:
            return {}
        if kind != "video":
            self.ignored.add("part.videoMetadata")  # on an image: nothing to read it for
            return {}
        if not isinstance(meta, dict):
            raise self.bad("bad_record", f"{where}: videoMetadata is not an object")
        self._report("part.videoMetadata", meta, {"startOffset", "start_offset", "endOffset", "end_offset", "fps"})
        out = {"fps": meta["fps"]} if "fps" in meta else {}
        for key, option in (("startOffset", "video_start"), ("endOffset", "video_end")):
            value = meta.get(key, meta.get(re.sub("([A-Z])", r"_\1", key).lower()))
            if value is not None:
                seconds = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(value).strip())
                if not seconds:
                    raise self.bad("bad_record", f"{where}: videoMetadata {key} {value!r} is not a duration "
                                                 "like '1.5s'")
                out[option] = float(seconds[1])
        return out

    def _bedrock_turn(self, turn, number: int) -> dict:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), list):
            raise self.bad("bad_record", f"messages[{number}] is not a {{role, content: [blocks]}} object")
        return {**turn, "content": [self._bedrock_block(b, f"messages[{number}]") for b in turn["content"]]}

    def bedrock_system(self, blocks) -> str:
        if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("text"), str)
                                                   for b in blocks):
            raise self.bad("bad_record", "'system' is neither text nor a list of {text: ...} blocks")
        return "".join(b["text"] for b in blocks)

    def _bedrock_block(self, block, where: str) -> dict:
        if isinstance(block, dict) and "type" in block:
            return block  # a typed part in a Bedrock-shaped record: read as such
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            self._report("part", block, {"text"})
            return {"type": "text", "text": block["text"]}
        kind = next((k for k in ("image", "video") if isinstance(block, dict) and isinstance(block.get(k), dict)),
                    None)
        if kind is None:
            raise self.bad("bad_record" if not isinstance(block, dict) or "document" not in block
                           else "unsupported_media", f"{where}: a Bedrock content block that is neither text, "
                                                     f"image nor video: {str(block)[:80]}")
        source = block[kind].get("source", {})
        self._report("part", block, {kind})
        self._report(f"part.{kind}", block[kind], {"format", "source"})
        self._report(f"part.{kind}.source", source, {"bytes", "s3Location"})
        if "bytes" in source:
            value = f"data:{kind}/{block[kind].get('format', 'png')};base64,{source['bytes']}"
            if kind == "video":
                raise self.bad("unsupported_media", f"{where}: an inline (bytes) video; give it as a file")
        elif isinstance(source.get("s3Location"), dict):
            value = source["s3Location"].get("uri", "")
        else:
            raise self.bad("bad_record", f"{where}: a Bedrock {kind} block with no source bytes or s3Location")
        return {"type": kind, kind: value}

    def _report(self, prefix: str, mapping: dict, read: set) -> None:
        """Keys of a part (or of a value inside one) that nothing reads: reported as ignored keys."""
        self.ignored.update(f"{prefix}.{key}" for key in mapping if key not in read)

    # -- turns and parts -------------------------------------------------------------------------
    def message(self, turn, number: int) -> dict:
        if not isinstance(turn, dict):
            raise self.bad("bad_record", f"turn {number} is not an object")
        speaker = turn.get("from", turn.get("role"))
        role = ROLE_NAMES.get(str(speaker).lower())
        if role is None:
            raise self.bad("bad_record", f"turn {number}: unknown speaker {speaker!r}")
        weight = _weight(turn, role)
        read = TURN_KEYS | ({"name"} if role == "tool" else set()) | ({"weight"} if weight is not None else set())
        self.ignored.update(f"turn.{key}" for key in turn if key not in read)
        content = turn.get("value", turn.get("content"))
        if str(speaker).lower() == "function_call":  # LLaMA-Factory's: the calls as JSON text, no content
            calls, content = tool_calls(content, True, number, self.bad), None
        else:
            calls = tool_calls(turn.get("tool_calls"), False, number, self.bad)
        parts = self.parts(content, f"turn {number} ({role})", allow_empty=bool(calls) or role == "system")
        loss = turn.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise self.bad("bad_record", f"turn {number}: 'loss' must be true or false, not {loss!r}")
        if loss and role != "assistant":
            raise self.bad("bad_record", f"turn {number} ({role}): 'loss': true on a turn that is not the "
                                         "assistant's; only assistant turns are learned")
        if weight is not None and loss is not None and (weight == 1) != loss:
            raise self.bad("bad_record", f"turn {number}: 'loss': {loss} and 'weight': {turn['weight']} disagree")
        learn = role == "assistant" and loss is not False and weight != 0
        message = {"role": role, "content": parts, "learn": learn}
        if calls:
            message["tool_calls"] = calls
        message.update({key: turn[key] for key in ("name", "tool_call_id") if role == "tool" and key in turn})
        return message

    def parts(self, content, where: str, allow_empty: bool = False) -> list[dict]:
        if isinstance(content, list):
            parts = [p for part in content for p in self._typed_part(part, where)]
        elif isinstance(content, str):
            parts = self._text_parts(content, where)
        elif content is None:
            parts = []
        else:
            raise self.bad("bad_record", f"{where}: content must be text or a list of parts, not "
                                         f"{type(content).__name__}")
        if not allow_empty and not any(p["type"] != "text" or p["text"].strip() for p in parts):
            raise self.bad("bad_record", f"{where} is empty")
        return parts

    def _text_parts(self, text: str, where: str) -> list[dict]:
        """A string with <image>/<video> (or MMMU's numbered <image N>) placeholders -> parts; <audio> is
        refused."""
        parts = []
        for piece in _PLACEHOLDERS.split(text):
            if piece == AUDIO_PLACEHOLDER:
                raise self.bad("unsupported_media", f"{where}: an {AUDIO_PLACEHOLDER} placeholder; audio is not "
                                                    "supported")
            if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                parts.append({"type": piece[1:-1]})
            elif piece.startswith("<image ") and piece[7:-1].isdigit():
                parts.append({"type": "image", "number": int(piece[7:-1])})
            elif piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def _typed_part(self, part, where: str) -> list[dict]:
        """OpenAI-style parts, in the spellings peers use: text under "text" or "value" (all of it text, an
        `<image>` spelled in it included: this layout's images are parts of their own); an image under "image",
        "image_url" ({"url": ...} or a string), "url", "path" or "value"; a video likewise; qwen-vl-utils'
        per-part pixel bounds and video sampling honoured."""
        if not isinstance(part, dict) or "type" not in part:
            raise self.bad("bad_record", f"{where}: a content part without a 'type': {str(part)[:60]}")
        self.ignored.update(f"part.{key}" for key in part if key not in PART_KEYS)
        kind = part["type"]
        if kind == "text":
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise self.bad("bad_record", f"{where}: a text part with no text (under 'text' or 'value')")
            # typed parts give each image a part of its own: an <image> spelled inside a text part is text
            return [{"type": "text", "text": text}] if text else []
        if kind in ("image", "image_url", "video", "video_url"):
            media = "image" if kind.startswith("image") else "video"
            key = next((k for k in (kind, f"{media}_url", "url", "path", "value") if k in part), None)
            value = part[key] if key else None
            if isinstance(value, dict):
                self.ignored.update(f"part.{key}.{k}" for k in value if k not in MEDIA_VALUE_KEYS)
                value = value.get("url", value.get("path", value.get("bytes")))
            options = {k: part[k] for k in (IMAGE_OPTIONS if media == "image" else VIDEO_OPTIONS) if k in part}
            if value is not None:  # a part without its media refers to the record's images/videos field
                refs = self.inline_images if media == "image" else self.inline_videos
                refs.append(self.image_ref(value, options) if media == "image" else self.video_ref(value, options))
            elif options:
                raise self.bad("bad_record", f"{where}: {sorted(options)} on a {media} part that does not hold its "
                                             f"{media}; put them beside the {media} they apply to")
            return [{"type": media}]
        if kind in ("audio", "input_audio", "audio_url"):
            raise self.bad("unsupported_media", f"{where}: an audio part; audio is not supported")
        raise self.bad("bad_record", f"{where}: unsupported content part type {kind!r}")


def _weight(turn: dict, role: str):
    """OpenAI's per-message `weight` on an assistant turn: 0 (not learned) or 1; None where it is absent or
    anything else (then reported as an ignored key)."""
    weight = turn.get("weight")
    return weight if role == "assistant" and weight in (0, 1) and not isinstance(weight, bool) else None
