"""What a chat template is given: a conversation's turns as plain strings or typed parts, as the template reads them."""

from __future__ import annotations


def template_message(message: dict, typed_text: bool = False) -> dict:
    """What a chat template takes: text-only turns as plain strings (what most templates accept), others as
    typed parts; every turn as typed parts where the template reads only those (`typed_text`)."""
    parts = message["content"]
    extra = {key: message[key] for key in ("tool_calls", "name", "tool_call_id") if key in message}
    if not typed_text and all(p["type"] == "text" for p in parts):
        return {"role": message["role"], "content": "".join(p["text"] for p in parts), **extra}
    return {"role": message["role"], "content": parts, **extra}


PROBE_WORD = "zqxprobe"


def typed_text_turns(processor, family: str) -> bool:
    """Whether the chat template must be given text turns as typed parts: some render a plain string as nothing
    (Idefics2/3's, as released, read `content[0]['type']` and loop over parts, so a string's text is dropped without
    an error: the turn, answers included, would train as empty). Probed on a one-turn conversation; a template
    that drops the text both ways is refused."""
    def renders(content) -> bool:
        try:
            text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn: not this probe's to judge
            return True
        return PROBE_WORD in text

    if renders(PROBE_WORD):
        return False
    if renders([{"type": "text", "text": PROBE_WORD}]):
        return True
    from ds_vlm.models import UnsupportedModel

    raise UnsupportedModel(f"model type {family!r}: its chat template drops a turn's text, given as a string or as "
                           "typed parts; fix the template (chat_template.jinja) so that it writes the text")
