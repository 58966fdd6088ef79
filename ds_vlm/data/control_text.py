"""Text is never control: a turn whose text spells a special token (`<|im_end|>`, `<|image_pad|>`, `<image>`,
`<|endoftext|>`) is encoded as those characters, never as the token. Only the chat template's own structure
(role headers, turn ends, the vision tokens of the record's images) produces control tokens.

The template's output mixes structure and the turns' text in one string, so the text is marked before the
template sees it: each special spelling in a turn's text becomes a marker (a private-use character pair no
tokenizer matches as a token). In the rendered string every special spelling left is then the template's own.
A piece of it that holds markers, cut at the template's special tokens around it, is tokenized with
`split_special_tokens` after the markers are turned back into their spellings; the tokenizer splits its input
at special tokens before anything else, so the rest of the ids are what they were. Text without any special
spelling never meets a marker: its ids are the tokenizer's ordinary ones.
"""

from __future__ import annotations

import re

# A marker is LEAD + one character naming what it stands for: LEAD itself (a text holding that character,
# kept unambiguous) or the k-th special spelling.
LEAD = "\U0010fffd"
_BASE = 0x100000


def special_spellings(tokenizer) -> list[str]:
    """The tokenizer's special tokens (added tokens marked special, and the named ones), longest first."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {token.content for token in decoder.values() if getattr(token, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", ()) or ())
    return sorted((s for s in found if s), key=lambda s: (-len(s), s))


class ControlText:
    """Marks special spellings in turns' text (`escape`), and cuts a rendered string into pieces to tokenize as
    usual and pieces of text to tokenize as text (`pieces`)."""

    def __init__(self, tokenizer):
        self.spellings = special_spellings(tokenizer)
        self._markers = {s: LEAD + chr(_BASE + 1 + k) for k, s in enumerate(self.spellings)}
        self._markers[LEAD] = LEAD + chr(_BASE)
        self._restore = {marker[1]: text for text, marker in self._markers.items()}
        alternatives = [re.escape(s) for s in [LEAD, *self.spellings]]
        self._spelled = re.compile("|".join(alternatives)) if self.spellings else re.compile(re.escape(LEAD))
        self._structure = re.compile("|".join(alternatives[1:])) if self.spellings else None
        self._marker = re.compile(re.escape(LEAD) + ".", re.S)

    def spelled(self, text: str) -> list[str]:
        """The special tokens `text` spells, in order of appearance."""
        return [m[0] for m in self._spelled.finditer(text) if m[0] != LEAD]

    def escape(self, text: str) -> str:
        return self._spelled.sub(lambda m: self._markers[m[0]], text)

    def escape_all(self, value):
        """`value` (a message, tool calls, tool schemas: dicts, lists and strings) with every string escaped."""
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, (list, tuple)):
            return [self.escape_all(v) for v in value]
        if isinstance(value, dict):
            return {k: self.escape_all(v) for k, v in value.items()}
        return value

    def spelled_all(self, value) -> set[str]:
        """The special tokens the strings inside `value` spell."""
        if isinstance(value, str):
            return set(self.spelled(value))
        if isinstance(value, (list, tuple)):
            return set().union(*(self.spelled_all(v) for v in value))
        if isinstance(value, dict):
            return set().union(*(self.spelled_all(v) for v in value.values()))
        return set()

    def restore(self, text: str) -> str:
        return self._marker.sub(lambda m: self._restore.get(m[0][1], m[0]), text)

    def pieces(self, rendered: str) -> list[tuple[str, bool]]:
        """`rendered` (a template's output over escaped text) as (piece, is_text) pairs that concatenate to it
        with the markers restored: each stretch between two of the template's special tokens that holds a marker
        is one text piece (restored), to tokenize with special tokens split; the rest are as they were."""
        if LEAD not in rendered:
            return [(rendered, False)]
        bounds = [0] + [i for m in self._structure.finditer(rendered) for i in m.span()] + [len(rendered)] \
            if self._structure else [0, len(rendered)]
        out: list[tuple[str, bool]] = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            stretch = rendered[start:end]
            if LEAD in stretch:
                out.append((self.restore(stretch), True))
            elif out and not out[-1][1]:
                out[-1] = (out[-1][0] + stretch, False)
            elif stretch:
                out.append((stretch, False))
        return out
