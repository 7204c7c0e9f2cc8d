"""Tool calling after training (issue #32): `speedtune train` on the glaive demo slice (the embedded SmolLM2, CPU),
its export (the GGUF's chat template and the Ollama Modelfile carry the tool format) and `speedtune serve`, whose
answers carry OpenAI `tool_calls` when the model writes `<tool_call>` blocks. A 2-step SmolLM2-135M cannot be relied
on to call a tool by itself, so the server's call path is driven by a request grammar (llama-cpp-python's `grammar`
field) that makes the real model write one; the parser is tested directly on text and on streams cut at every
character."""

from __future__ import annotations

import json

import pytest
from conftest import cli_here

from speedtune.paths import demo_dir
from speedtune.inference.tool_calls import _stream, parse_calls

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object", "required": ["city"],
                                                             "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>'


def test_parse_calls():
    content, calls = parse_calls(f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Rome')}")
    assert content == "Let me check."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "get_weather", {"city": "Paris"}), ("function", "get_weather", {"city": "Rome"})]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert parse_calls("It is 21 C in Paris.") == ("It is 21 C in Paris.", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"  # not a call: left in the text as the model wrote it
    assert parse_calls(broken) == (broken, [])


def chunks_of(text: str, size: int, finish: str = "stop"):
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    for i in range(0, len(text), size):
        yield {**base, "choices": [{"index": 0, "delta": {"content": text[i:i + size]}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}


@pytest.mark.parametrize("size", [1, 2, 5, 200])
def test_stream_parser_at_every_cut(size):
    for text, want_calls in ((f"Checking.\n{CALL}", 1), ("Paris is sunny, <tool not a call>.", 0), (CALL, 1)):
        out = list(_stream(chunks_of(text, size)))
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in out)
        calls = [tc for c in out for tc in c["choices"][0]["delta"].get("tool_calls") or []]
        content, parsed = parse_calls(text)
        assert streamed == content and [c["function"] for c in calls] == [c["function"] for c in parsed]
        assert out[-1]["choices"][0]["finish_reason"] == ("tool_calls" if want_calls else "stop")
        assert len(calls) == want_calls and all(c["index"] == 0 for c in calls)
        if not want_calls:  # plain text streams as it comes, not at the end
            assert sum(1 for c in out if c["choices"][0]["delta"].get("content")) >= min(len(text) // size, 3)


@pytest.fixture(scope="module")
def tool_export(smollm2, tmp_path_factory):
    """1 CPU step of the embedded model on the glaive slice, exported to q8_0 with a Modelfile."""
    base = tmp_path_factory.mktemp("tools")
    r = cli_here("train", "--model", "smollm2-135m", "--data", demo_dir() / "glaive_toolcall_40.jsonl", "--max-steps",
                 1, "--batch-size", 1, "--grad-accum", 1, "--seq-len", 1024, "--output", base / "run")
    assert r.returncode == 0, r.stderr
    r = cli_here("export", base / "run", "--gguf", "q8_0", "--ollama", "--output", base / "export")
    assert r.returncode == 0, r.stderr
    return base


@pytest.mark.slow
def test_trained_run_and_export_carry_the_tool_format(tool_export, tokenizer):
    import yaml

    from speedtune.exporting import gguf_tools
    from speedtune.data import templates

    jinja = templates.named("chatml-tools", tokenizer).jinja
    plan = yaml.safe_load((tool_export / "run" / "run_config.yaml").read_text())["plan"]
    assert plan["data"]["template"] == "chatml-tools" and plan["data"]["format"] == "sharegpt"
    assert json.loads((tool_export / "run" / "metrics.json").read_text())["steps"] == 1
    gguf = next((tool_export / "export").glob("*-q8_0.gguf"))
    assert gguf_tools.metadata(gguf)["chat_template"] == jinja
    mf = (tool_export / "export" / "Modelfile").read_text()
    assert ".Tools" in mf and ".ToolCalls" in mf and "<tool_response>" in mf
    assert json.loads((tool_export / "export" / "export_report.json").read_text())["ollama_tools"] is None


@pytest.fixture(scope="module")
def tool_server(tool_export):
    from test_serve import serving

    yield from serving(next((tool_export / "export").glob("*-q8_0.gguf")))


def gbnf(text: str) -> str:
    """A grammar that lets the model write exactly `text`."""
    return "root ::= " + json.dumps(text)


@pytest.mark.slow
def test_server_returns_openai_tool_calls(tool_server, tokenizer):
    from openai import OpenAI

    from speedtune.data import templates

    c = OpenAI(base_url=tool_server, api_key="none", max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model="smol", messages=ask, tools=WEATHER, max_tokens=64, temperature=0,
                                  extra_body={"grammar": gbnf(CALL)})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the prompt was the GGUF's template with the tools in it, token for token what training renders
    t = templates.named("chatml-tools", tokenizer)
    prompt = t.render(tokenizer, ask, add_generation_prompt=True, tools=WEATHER)
    assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    # streamed: the same call as deltas
    deltas = [ch.choices[0] for ch in c.chat.completions.create(
        model="smol", messages=ask, tools=WEATHER, max_tokens=64, temperature=0, stream=True,
        extra_body={"grammar": gbnf(CALL)}) if ch.choices]
    streamed = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [("get_weather",
                                                                                          {"city": "Paris"})]
    assert deltas[-1].finish_reason == "tool_calls"
    # the call and its result sent back (arguments as JSON text, as OpenAI clients send them): the prompt is the
    # training rendering, and a plain answer comes back as text
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r = c.chat.completions.create(model="smol", messages=history, tools=WEATHER, max_tokens=24, temperature=0,
                                  extra_body={"grammar": gbnf("It is 21 C in Paris.")})
    assert r.choices[0].message.content == "It is 21 C in Paris." and not r.choices[0].message.tool_calls
    trained = [*ask, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}'}]
    prompt = t.render(tokenizer, trained, add_generation_prompt=True, tools=WEATHER)
    assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    # without tools: an ordinary chat answer, no tool_calls
    r = c.chat.completions.create(model="smol", messages=ask, max_tokens=16, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
