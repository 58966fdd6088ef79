"""Tool use in records: sharegpt's (LLaMA-Factory's `function_call` and `observation` turns, a `tools` field) and
messages/openai's (an assistant message's `tool_calls`, `tool` messages, a `tools` field). A call is an
assistant turn (learned), an observation a `tool` turn (masked), both rendered by the chat template's tool
roles; a template without them refuses such records by name (encode.py). `bad(kind, detail)` makes the record's
DataError (formats._Reader.bad)."""

from __future__ import annotations

import json
from typing import Optional


def tool_calls(value, from_text: bool, number: int, bad) -> list[dict]:
    """An assistant turn's tool calls as the chat templates take them ([{type, function: {name, arguments}}]):
    `value` is LLaMA-Factory's `function_call` turn's JSON text (`from_text`), or OpenAI's `tool_calls`."""
    if from_text:
        try:
            calls = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as err:
            raise bad("bad_record", f"turn {number} (function_call) is not JSON: {err}") from err
    elif value is None:
        return []
    else:
        calls = value
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad("bad_record", f"turn {number}: a tool call without a function name: {str(call)[:80]}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as the text it is
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def record_tools(record: dict, bad) -> Optional[list]:
    """The record's `tools` (a list, or JSON text of one, as LLaMA-Factory stores it)."""
    tools = record.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise bad("bad_record", f"'tools' is not JSON: {err}") from err
    return tools if isinstance(tools, list) else [tools]
