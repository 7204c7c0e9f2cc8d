"""Tool calls in `speedtune serve`'s answers, in OpenAI's form.

llama-cpp-python renders a request's `tools` and the messages' `tool_calls` through the GGUF's own chat template
(speedtune's bundled chatml-tools, or a Qwen2.5/3 model's own), but returns what the model writes as plain text. Its
function-calling handlers (`chatml-function-calling`, `functionary`) would replace that template with a prompt format
of their own that the model was not trained on, so instead the model's `<tool_call>{"name": ..., "arguments": ...}
</tool_call>` blocks (the Hermes/Qwen format that chatml-tools trains) are parsed here, out of the text it generated
from its own template, into `message.tool_calls` with finish_reason "tool_calls". A block that is not a JSON object
with a name stays in the answer's text, as the model wrote it.

Hooked in as the Llama's chat handler around the template's own, so that streamed and whole answers both pass through
it; with `tool_choice` naming a function, llama-cpp-python's own grammar-constrained call is left as it is."""

from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(the text without its call blocks, the calls in OpenAI's form: arguments as JSON text)."""
    calls, kept, last = [], [], 0
    for m in BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else
                                   json.dumps(args, ensure_ascii=False)}})
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def canonical(messages: list[dict]) -> list[dict]:
    """OpenAI clients send a call's arguments as JSON text; the template writes them from an object, as training
    rendered them (compact, sorted keys for chatml-tools), so the text is parsed back where it is JSON."""
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                f = dict(c.get("function") or {})
                if isinstance(f.get("arguments"), str):
                    try:
                        f["arguments"] = json.loads(f["arguments"])
                    except ValueError:
                        pass  # not JSON: the template writes it as it came
                calls.append({**c, "function": f})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def request_body(body: bytes) -> bytes:
    """OpenAI clients send the assistant's call back with `"content": null`, which llama-cpp-python's request model
    refuses (its assistant content is text or absent): such a null is dropped. Anything else passes unchanged."""
    try:
        data = json.loads(body)
    except ValueError:
        return body  # the validation that follows says what is wrong
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return body
    nulls = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant" and "content" in m
             and m["content"] is None and m.get("tool_calls")]
    for m in nulls:
        del m["content"]
    return json.dumps(data).encode() if nulls else body


def with_tool_calls(llama):
    """Route this Llama's chat completions through `parse_calls` when a request carries tools."""
    from llama_cpp import llama_chat_format

    handler = (llama.chat_handler or llama._chat_handlers.get(llama.chat_format)
               or llama_chat_format.get_chat_completion_handler(llama.chat_format))

    def handle(*args, **kwargs):
        if kwargs.get("messages"):
            kwargs["messages"] = canonical(kwargs["messages"])
        result = handler(*args, **kwargs)
        choice = kwargs.get("tool_choice")
        if not kwargs.get("tools") or choice == "none" or isinstance(choice, dict):
            return result
        return _stream(result) if kwargs.get("stream") else _whole(result)

    llama.chat_handler = handle
    return llama


def _whole(result: dict) -> dict:
    for choice in result.get("choices", []):
        message = choice.get("message") or {}
        content, calls = parse_calls(message.get("content") or "")
        if calls:
            message["content"] = content or None
            message["tool_calls"] = calls
            if choice.get("finish_reason") == "stop":
                choice["finish_reason"] = "tool_calls"
    return result


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could be the start of a `<tool_call>` tag."""
    return next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)


def _chunk(like: dict, delta: dict, finish: str | None = None) -> dict:
    return {**like, "choices": [{**like["choices"][0], "delta": delta, "finish_reason": finish}]}


def _stream(chunks):
    """Text streams as it comes until a call block begins; from there on the rest waits for the end of the answer
    (a call is only known once its block closes), then the calls follow as tool_calls deltas."""
    held, calling, last = "", False, None
    for chunk in chunks:
        if not chunk.get("choices"):
            yield chunk
            continue
        choice, last = chunk["choices"][0], chunk
        held += (choice.get("delta") or {}).get("content") or ""
        if choice.get("finish_reason"):
            break
        if (choice.get("delta") or {}).get("content") is None:
            yield chunk  # the role, or anything else without text
            continue
        if not calling and OPEN in held:
            calling = True
            before, held = held.split(OPEN, 1)
            held = OPEN + held
            if before.rstrip():
                yield _chunk(chunk, {"content": before.rstrip()})
        if not calling:  # what could still be the start of a call (a partial tag, whitespace before it) waits
            safe = len(held[:len(held) - _partial_open(held)].rstrip())
            if safe:
                yield _chunk(chunk, {"content": held[:safe]})
                held = held[safe:]
    if last is None:
        return
    content, calls = parse_calls(held) if calling else (held, [])
    if content:
        yield _chunk(last, {"content": content})
    for i, call in enumerate(calls):
        yield _chunk(last, {"tool_calls": [{"index": i, **call}]})
    finish = last["choices"][0].get("finish_reason") or "stop"
    yield _chunk(last, {}, "tool_calls" if calls and finish == "stop" else finish)
