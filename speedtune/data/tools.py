"""Tool-calling conversations. Two ways data writes them, one form inside:

- ShareGPT / LLaMA-Factory: `function_call` turns (the assistant's call, a JSON object {"name", "arguments"} or a list
  of them) and `observation` turns (the tool's result), with a `tools` column (a JSON string or a list of function
  definitions);
- OpenAI: `messages` with assistant `tool_calls` ({"function": {"name", "arguments": JSON text or an object}}),
  `role: tool` turns, and a `tools` column.

Inside, as `transformers`' chat templates take them: an assistant message with `tool_calls` (each
{"type": "function", "function": {"name", "arguments": dict}}), a {"role": "tool", "content"} message per result, and
the tools list ({"type": "function", "function": {...}}) passed beside the messages as `tools=`. A conversation goes
user -> assistant, where an assistant turn that calls is followed by one or more tool turns and then the assistant
again. The model's own chat template renders it when it takes `tools=` (Llama-3.1/3.2, Qwen2.5/3); a ChatML model
without tool support (SmolLM2) gets the bundled `chatml-tools` template."""

from __future__ import annotations

import json

from speedtune.errors import RowError, UserError

CALL_ROLES = {"function_call"}  # ShareGPT: the assistant calls
RESULT_ROLES = {"observation", "tool", "function", "ipython"}  # the tool answers
BUNDLED = "chatml-tools"
CALL_FORM = 'a call is {"name": "NAME", "arguments": {...}}'


def _error(where: str, reason: str) -> RowError:
    return RowError(where, reason)


def turn(where: str, n: int, role, content, raw: dict, tags: dict) -> dict | None:
    """Turn `n` (1-based, as in the file) as a message, when it is a tool call or a tool result; None otherwise."""
    role = str(role).lower()
    if role in CALL_ROLES | {str(tags.get("function_tag", "")).lower()} - {""}:
        return {"role": "assistant", "content": "", "tool_calls": _calls(where, n, content, role)}
    if role in RESULT_ROLES | {str(tags.get("observation_tag", "")).lower()} - {""}:
        return {"role": "tool", "content": _result(where, n, content)}
    if role in ("assistant", "gpt") and raw.get("tool_calls"):  # OpenAI form
        text = content if isinstance(content, str) else ""
        return {"role": "assistant", "content": text, "tool_calls": _calls(where, n, raw["tool_calls"], "tool_calls")}
    return None


def _calls(where: str, n: int, value, what: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _error(where, f"turn {n} ({what}): the call is not valid JSON ({e.msg} at character {e.pos}); "
                                f"{CALL_FORM}") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise _error(where, f"turn {n} ({what}): no call in it; {CALL_FORM}")
    return [_call(where, n, c, what) for c in calls]


def _call(where: str, n: int, call, what: str) -> dict:
    """One call, from {"name", "arguments"} or OpenAI's {"type": "function", "function": {...}}."""
    f = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"].strip():
        raise _error(where, f"turn {n} ({what}): a call without a function name; {CALL_FORM}")
    args = f.get("arguments", f.get("parameters", {}))
    if isinstance(args, str):  # OpenAI writes the arguments as JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _error(where, f"turn {n} ({what}): the arguments of '{f['name']}' are not valid JSON "
                                f"({e.msg} at character {e.pos}); {CALL_FORM}") from None
    if not isinstance(args, dict):
        raise _error(where, f"turn {n} ({what}): the arguments of '{f['name']}' must be a JSON object, got "
                            f"{type(args).__name__}; {CALL_FORM}")
    out = {"type": "function", "function": {"name": f["name"], "arguments": args}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _result(where: str, n: int, content) -> str:
    if isinstance(content, (dict, list)):  # a result written as JSON rather than as text
        return json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise _error(where, f"turn {n} (tool result) must be text, got {type(content).__name__}")
    return content


def row_tools(where: str, value) -> list[dict]:
    """The `tools` column: a JSON string or a list of function definitions, bare (LLaMA-Factory) or wrapped in
    {"type": "function", "function": ...} (OpenAI); empty or missing is no tools."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _error(where, f"the tools column is not valid JSON ({e.msg} at character {e.pos}); it is a list "
                                'of functions: [{"name": ..., "description": ..., "parameters": {...}}]') from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _error(where, f"the tools column must be a list of functions, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value, 1):
        f = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise _error(where, f"tool {i} in the tools column has no name; a tool is "
                                '{"name": ..., "description": ..., "parameters": {...}}')
        out.append({"type": "function", "function": f})
    return out


def count(counts: dict[str, int], messages: list[dict], listed: list[dict] | None) -> None:
    """Add one usable row to `data check`'s tool counts."""
    calls = sum(len(m.get("tool_calls") or []) for m in messages)
    for key, n in (("rows with calls", int(calls > 0)), ("calls", calls),
                   ("results", sum(m["role"] == "tool" for m in messages)), ("rows listing tools", int(bool(listed)))):
        counts[key] = counts.get(key, 0) + n


def has_tool_turns(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def uses_tools(records, fmt: str, columns: dict[str, str], tags: dict) -> bool:
    """Whether any row has a tools list, a call or a tool result (then a tool-aware template is needed)."""
    if fmt not in ("chat", "sharegpt"):
        return False
    key = columns.get("messages" if fmt == "chat" else "conversations", "messages" if fmt == "chat" else
                      "conversations")
    roles = CALL_ROLES | RESULT_ROLES | {str(tags.get(t, "")).lower() for t in ("function_tag", "observation_tag")}
    role_key = tags.get("role_tag")
    for rec in records:
        if rec.data.get(columns.get("tools", "tools")) not in (None, "", "[]", []):
            return True
        for t in rec.data.get(key) or []:
            if isinstance(t, dict) and (t.get("tool_calls") or
                                        str(t.get(role_key) if role_key else t.get("role", t.get("from"))).lower()
                                        in roles):
                return True
    return False


def validate(where: str, messages: list[dict]) -> None:
    """user -> assistant, and an assistant turn that calls -> tool result(s) -> assistant; the last turn is the
    assistant's (an answer or a call)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise _error(where, "a system message may only come first")
    follows = {None: ("user",), "user": ("assistant", "call"), "assistant": ("user",), "call": ("tool",),
               "tool": ("tool", "assistant", "call")}
    said = {"user": "a user turn", "assistant": "an assistant answer", "call": "a function call", "tool": "a tool "
            "result (observation)"}
    prev = None
    for i, m in enumerate(body, 1):
        kind = "call" if m.get("tool_calls") else m["role"]
        if kind not in follows[prev]:
            want = " or ".join(said[k] for k in follows[prev])
            raise _error(where, f"turn {i} is {said[kind]} where {want} was expected" +
                         (" (a tool result must answer a function call)" if kind == "tool" else "") +
                         (" (a function call must be followed by its result)" if prev == "call" else ""))
        if kind in ("user", "assistant") and not m["content"].strip():
            raise _error(where, f"turn {i}: empty {m['role']} turn" +
                         (" (nothing to learn); fill or drop the row" if kind == "assistant" else ""))
        prev = kind
    if prev in (None, "user"):
        raise _error(where, "the conversation ends with a user turn: there is no answer to learn" if prev else
                            "no user or assistant turn")
    if prev == "tool":
        raise _error(where, "the conversation ends with a tool result: there is no answer to learn")


PROBE_TOOLS = [{"type": "function", "function": {"name": "speedtune_probe", "description": "SPEEDTUNExTOOL",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"x": {"type": "string"}}}}}]
PROBE = [{"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "speedtune_probe", "arguments": {"x": "SPEEDTUNExARG"}}}]},
         {"role": "tool", "content": "SPEEDTUNExRESULT"}, {"role": "assistant", "content": "Done."}]


def supports_tools(template, tokenizer) -> bool:
    """The template writes the tools list, the call and its result (tried, after a look for `tools` in its text)."""
    if "tools" not in template.jinja and "tool_calls" not in template.jinja:
        return False
    try:
        text = template.render(tokenizer, PROBE, tools=PROBE_TOOLS)
    except Exception:  # a template that rejects the conversation (raise_exception) does not take it
        return False
    return all(s in text for s in ("SPEEDTUNExTOOL", "SPEEDTUNExARG", "SPEEDTUNExRESULT"))


def template_for(name: str | None, tokenizer):
    """The template for tool-calling data: --template NAME if it writes tools, else the model's own if it does, else
    the bundled chatml-tools for a ChatML model."""
    from speedtune.data import templates

    if name:
        t = templates.named(name, tokenizer)
        if not supports_tools(t, tokenizer):
            raise UserError(f"--template {name} does not write tools or tool calls, and the data has them; use "
                            f"--template {BUNDLED} (ChatML models) or leave --template out to use the model's own "
                            "when it takes tools (Llama-3.1/3.2, Qwen2.5/3)")
        return t
    own = templates.own(tokenizer)
    if supports_tools(own, tokenizer):
        return own
    if own.eot == "<|im_end|>" and len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) == 1:
        return templates.named(BUNDLED, tokenizer)
    raise UserError("the data has tool calls, and the model's chat template does not write tools, nor is it ChatML "
                    f"for the bundled {BUNDLED} template; train a model whose template takes tools (Llama-3.1/3.2, "
                    "Qwen2.5/3), or pass a --template that writes them")
