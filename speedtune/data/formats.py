"""Rows -> conversations. Every format becomes a list of {role, content} messages (system?, user, assistant, ...),
validated on the way: a bad row raises RowError naming where it is and what is wrong."""

from __future__ import annotations

from speedtune.data import tools
from speedtune.data.sources import Record, Source
from speedtune.errors import RowError, UserError

FORMATS = ("alpaca", "chat", "sharegpt", "text", "pair")
TARGETS = {"instruction", "input", "output", "system", "history", "messages", "conversations", "text",
           "user", "assistant", "tools", "prompt", "chosen", "rejected"}  # the last three: preference pairs
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}


def parse_columns(text: str | None) -> dict[str, str]:
    """`user=Patient,assistant=Doctor` -> {"user": "Patient", "assistant": "Doctor"}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UserError(f"--columns: '{part}' is not name=column (e.g. --columns user=Patient,assistant=Doctor)")
        if key not in TARGETS:
            raise UserError(f"--columns: unknown field '{key}' (known: {', '.join(sorted(TARGETS))})")
        out[key] = value
    return out


def detect(source: Source, fmt: str | None, columns: dict[str, str]) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise UserError(f"--format: unknown format '{fmt}' (known: {', '.join(FORMATS)})")
        return fmt
    if source.format_hint:
        return source.format_hint
    if {"user", "assistant"} & columns.keys():
        return "pair"
    keys = set(source.records[0].data)
    mapped = {k for k, v in columns.items() if v in keys} | (keys & TARGETS)
    for name, needs in (("chat", {"messages"}), ("sharegpt", {"conversations"}), ("alpaca", {"instruction", "output"}),
                        ("text", {"text"})):
        if needs <= mapped:
            return name
    raise UserError(f"{source.records[0].where}: can't tell the data format from its columns "
                    f"({', '.join(sorted(keys)) or 'none'}); pass --format (alpaca, chat, sharegpt, text) and "
                    "--columns, e.g. --columns instruction=question,output=answer or user=Patient,assistant=Doctor")


def check_columns(source: Source, fmt: str, columns: dict[str, str]) -> None:
    """Fail once, up front, when a mapped or required column is missing from the data."""
    keys = set(source.records[0].data)
    where = source.records[0].where
    for target, col in columns.items():
        if col not in keys:
            raise UserError(f"{where}: column '{col}' (mapped to {target} by --columns) is not in the data; "
                            f"columns are: {', '.join(sorted(keys))}")
    required = {"alpaca": ["instruction", "output"], "chat": ["messages"], "sharegpt": ["conversations"],
                "text": ["text"], "pair": ["user", "assistant"]}[fmt]
    for target in required:
        col = columns.get(target, target)
        if col not in keys:
            raise UserError(f"{where}: the {fmt} format needs a '{target}' column, and the data has "
                            f"{', '.join(sorted(keys))}; map one with --columns {target}=YOUR_COLUMN")


def to_messages(rec: Record, fmt: str, columns: dict[str, str], tags: dict[str, str] | None = None) -> list[dict]:
    """One row -> a validated conversation (for `text`: a single {"role": "text"} message)."""
    def get(name, default=None):
        return rec.data.get(columns.get(name, name), default)

    if fmt == "text":
        text = get("text")
        if not isinstance(text, str) or not text.strip():
            raise RowError(rec.where, "empty or missing text")
        return [{"role": "text", "content": text}]
    messages: list[dict] = []
    system = get("system")
    if system:
        messages.append({"role": "system", "content": _text(rec, system, "system")})
    if fmt == "alpaca":
        for turn in get("history") or []:
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise RowError(rec.where, "history must be a list of [instruction, response] pairs")
            messages += [{"role": "user", "content": _text(rec, turn[0], "history")},
                         {"role": "assistant", "content": _text(rec, turn[1], "history")}]
        instruction, inp = get("instruction"), get("input")
        prompt = _text(rec, instruction, "instruction")
        if isinstance(inp, str) and inp.strip():
            prompt = f"{prompt}\n\n{inp}" if prompt else inp
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(rec, get("output"), "output")}]
    elif fmt == "pair":
        messages += [{"role": "user", "content": _text(rec, get("user"), "user")},
                     {"role": "assistant", "content": _text(rec, get("assistant"), "assistant")}]
    else:
        turns = get("messages" if fmt == "chat" else "conversations")
        if not isinstance(turns, list) or not turns:
            raise RowError(rec.where, f"'{columns.get('messages', 'messages') if fmt == 'chat' else 'conversations'}' "
                                      "must be a non-empty list of turns")
        tags = tags or {}
        role_key, content_key = tags.get("role_tag"), tags.get("content_tag")
        custom = {tags.get("user_tag"): "user", tags.get("assistant_tag"): "assistant", tags.get("system_tag"): "system"}
        for n, turn in enumerate(turns, 1):
            if not isinstance(turn, dict):
                raise RowError(rec.where, "each turn must be an object with role/content (or from/value)")
            role = turn.get(role_key) if role_key else turn.get("role", turn.get("from"))
            content = turn.get(content_key) if content_key else turn.get("content", turn.get("value"))
            norm = custom.get(role) or ROLE_ALIASES.get(str(role).lower())
            called = tools.turn(rec.where, n, norm or role, content, turn, tags)  # a tool call or a tool result
            if called:
                messages.append(called)
                continue
            if norm is None:
                raise RowError(rec.where, f"unknown role '{role}' (known: user/human, assistant/gpt, system, "
                                          "function_call, observation/tool)")
            messages.append({"role": norm, "content": _text(rec, content, norm)})
    validate(rec.where, messages)
    return messages


def _text(rec: Record, value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(rec.where, f"{what} must be text, got {type(value).__name__}")
    return value


def validate(where: str, messages: list[dict]) -> None:
    if tools.has_tool_turns(messages):
        return tools.validate(where, messages)
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise RowError(where, "a system message may only come first")
    if not body:
        raise RowError(where, "no user or assistant turn")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError(where, f"turn {i + 1} is '{m['role']}' where '{expected}' was expected "
                                  f"({'two ' + m['role'] + ' turns in a row' if i and body[i - 1]['role'] == m['role'] else 'turns must alternate user, assistant'})")
        if m["role"] == "user" and not m["content"].strip():
            raise RowError(where, f"turn {i + 1}: empty user turn")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(where, f"turn {i + 1}: empty assistant turn (nothing to learn); fill or drop the row")
    if body[-1]["role"] != "assistant":
        raise RowError(where, "the conversation ends with a user turn: there is no answer to learn")
