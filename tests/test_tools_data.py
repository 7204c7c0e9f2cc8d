"""Tool-calling data (issue #32): LLaMA-Factory's glaive demo (ShareGPT `function_call` / `observation` turns and a
`tools` column, a slice shipped in speedtune/demo) and its OpenAI form (`tool_calls`, `role: tool`), rendered through
the bundled chatml-tools template for SmolLM2 (its own template has no tool support) or a model's own template when it
writes tools; the trained tokens are exactly the calls and the answers; bad rows are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_user_error, cli_here

from speedtune.data import templates, tools
from speedtune.data.dataset import DataOptions, build
from speedtune.data.encode import IGNORE
from speedtune.exporting.deploy import modelfile
from speedtune.errors import UserError
from speedtune.paths import demo_dir

GLAIVE = demo_dir() / "glaive_toolcall_40.jsonl"
OPENAI = demo_dir() / "toolcall_openai.jsonl"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object", "required": ["city"],
                                                             "properties": {"city": {"type": "string"}}}}}]


def glaive_rows() -> list[dict]:
    return [json.loads(line) for line in GLAIVE.read_text().splitlines()]


def trained_spans(ex, tok) -> list[str]:
    """The trained tokens, decoded run by run (a run: consecutive trained positions)."""
    runs, current = [], []
    for tid in ex.labels + [IGNORE]:
        if tid != IGNORE:
            current.append(tid)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


def expected_spans(row: dict) -> list[str]:
    """What the assistant says in a glaive row, written out from the raw row: each answer, and each call in the
    bundled template's form (compact JSON arguments with sorted keys), each with its end of turn."""
    out = []
    for t in row["conversations"]:
        if t["from"] == "gpt":
            out.append(t["value"] + "<|im_end|>")
        elif t["from"] == "function_call":
            call = json.loads(t["value"])
            args = json.dumps(call["arguments"], separators=(",", ":"), sort_keys=True, ensure_ascii=False)
            out.append(f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call><|im_end|>')
    return out


def test_glaive_masks_are_exactly_the_calls_and_answers(tokenizer):
    built = build(DataOptions(str(GLAIVE)), tokenizer, 1024)
    assert built.format == "sharegpt" and built.template.name == "chatml-tools" and len(built.examples) == 40
    rows = glaive_rows()
    with_calls = 0
    for ex, row in zip(built.examples, rows):
        assert trained_spans(ex, tokenizer) == expected_spans(row), ex.where
        assert ex.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # ends on the end of turn, once
        assert tokenizer.decode(ex.input_ids) == ex.text
        with_calls += any(t["from"] == "function_call" for t in row["conversations"])
        # tool results, the tools list and the system turn are in the text and never trained
        for t in row["conversations"]:
            if t["from"] == "observation":
                assert f"<tool_response>\n{t['value']}\n</tool_response>" in ex.text
        assert ("<tools>" in ex.text) == bool(json.loads(row["tools"] or "[]"))
        assert all("<tools>" not in s and "<tool_response>" not in s
                                            for s in trained_spans(ex, tokenizer))
    assert with_calls >= 20  # the slice is mostly tool conversations


def test_openai_form_encodes_exactly_as_the_sharegpt_form(tokenizer, tmp_path):
    """toolcall_openai.jsonl is the glaive slice's call rows rewritten in OpenAI's form (arguments as JSON text,
    tool_call ids, wrapped tools): the same tokens and the same labels."""
    sharegpt = build(DataOptions(str(GLAIVE)), tokenizer, 1024).examples
    openai = build(DataOptions(str(OPENAI)), tokenizer, 1024)
    assert openai.format == "chat" and openai.template.name == "chatml-tools" and len(openai.examples) == 8
    calling = [ex for ex, row in zip(sharegpt, glaive_rows())
               if any(t["from"] == "function_call" for t in row["conversations"])]
    for a, b in zip(openai.examples, calling):
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_parallel_calls_and_the_bundled_template_is_apply_chat_template(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "Checking both.", "tool_calls": [
                    {"id": "a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},  # OpenAI: JSON text
                    {"id": "b", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},  # or an object
                {"role": "tool", "tool_call_id": "a", "content": "21 C"}, {"role": "tool", "content": "25 C"},
                {"role": "assistant", "content": "Paris 21 C, Rome 25 C."}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": WEATHER}) + "\n")
    ex = build(DataOptions(str(path)), tokenizer, 512).examples[0]
    call = '<tool_call>\n{{"name": "get_weather", "arguments": {{"city":"{}"}}}}\n</tool_call>'
    assert trained_spans(ex, tokenizer) == [f"Checking both.\n{call.format('Paris')}\n{call.format('Rome')}<|im_end|>",
                                            "Paris 21 C, Rome 25 C.<|im_end|>"]
    jinja = templates.named("chatml-tools", tokenizer).jinja
    norm = [{**m, "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": c}}}
                                 for c in ("Paris", "Rome")]} if m.get("tool_calls") else m for m in messages]
    full = tokenizer.apply_chat_template(norm, tools=WEATHER, chat_template=jinja, tokenize=False)
    assert ex.text == full.rstrip("\n")


def test_template_choice(tokenizer, smollm2):
    from transformers import AutoTokenizer

    from test_llama3_template import META, llama3_tokenizer

    assert templates.own(tokenizer).name == "model" and not tools.supports_tools(templates.own(tokenizer), tokenizer)
    assert tools.template_for(None, tokenizer).name == "chatml-tools"
    with pytest.raises(UserError, match="--template chatml does not write tools"):
        tools.template_for("chatml", tokenizer)
    # a model whose own template writes tools keeps its own
    own_tools = AutoTokenizer.from_pretrained(smollm2)
    own_tools.chat_template = templates.named("chatml-tools", tokenizer).jinja
    assert tools.template_for(None, own_tools).name == "model"
    # Llama-3 (8B Instruct's template has no tools, and it is not ChatML): one clear error
    with pytest.raises(UserError, match="does not write tools, nor is it ChatML"):
        tools.template_for(None, llama3_tokenizer(smollm2, META))


PUBLISHED = {  # the call as each published template writes it, and its end of turn
    "qwen2.5-instruct": ('<tool_call>\n{{"name": "{}", "arguments": {}}}\n</tool_call>', "<|im_end|>"),
    "llama-3.2-instruct": ('{{"name": "{}", "parameters": {}}}', "<|eot_id|>"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_templates_that_take_tools_render_them_themselves(name, smollm2):
    """Qwen2.5's and Llama-3.2's own templates (tests/data) on a tokenizer with their special tokens: the model's own
    template is used, and the trained spans are the calls as that template writes them and the answers."""
    from transformers import AutoTokenizer

    from test_llama3_template import llama3_tokenizer

    jinja = (Path(__file__).parent / "data" / f"{name}.jinja").read_text()
    if name.startswith("qwen"):
        tok = AutoTokenizer.from_pretrained(smollm2)  # ChatML tokens, as Qwen's
        tok.chat_template = jinja
    else:
        tok = llama3_tokenizer(smollm2, jinja)
    call_form, eot = PUBLISHED[name]
    built = build(DataOptions(str(OPENAI)), tok, 2048)
    assert built.template.name == "model" and built.template.eot == eot
    for ex, line in zip(built.examples, OPENAI.read_text().splitlines()):
        row = json.loads(line)
        # the file's arguments are JSON text as json.dumps writes it, as these templates' tojson writes an object
        want = [call_form.format(m["tool_calls"][0]["function"]["name"], m["tool_calls"][0]["function"]["arguments"])
                + eot if m.get("tool_calls") else m["content"] + eot
                for m in row["messages"] if m["role"] == "assistant"]
        assert trained_spans(ex, tok) == want


def test_export_warns_when_the_modelfile_would_drop_tools(tokenizer, smollm2):
    """Qwen2.5's own template writes tools, and is matched to chatml for the Modelfile, whose TEMPLATE does not: the
    export says so. The bundled chatml-tools' TEMPLATE writes them; SmolLM2's own takes no tools."""
    from transformers import AutoTokenizer

    from speedtune.exporting.deploy import tools_gap

    qwen = AutoTokenizer.from_pretrained(smollm2)
    qwen.chat_template = (Path(__file__).parent / "data" / "qwen2.5-instruct.jinja").read_text()
    own = templates.own(qwen)
    assert own.ollama == templates.named("chatml", qwen).ollama
    assert "Delete the TEMPLATE block" in tools_gap(own, qwen)
    assert tools_gap(templates.named("chatml-tools", tokenizer), tokenizer) is None
    assert tools_gap(templates.own(tokenizer), tokenizer) is None


def test_check_and_preview_through_dataset_info_and_files(tmp_path, smollm2):
    shutil.copy(GLAIVE, tmp_path / "glaive.jsonl")
    # LLaMA-Factory's own entry for its demo, pointed at the slice
    (tmp_path / "dataset_info.json").write_text(json.dumps({"glaive_toolcall_en_demo": {
        "file_name": "glaive.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"}}}))
    r = cli_here("data", "check", f"{tmp_path}/dataset_info.json:glaive_toolcall_en_demo")
    assert r.returncode == 0, r.stderr
    assert "chatml-tools" in r.stdout and "40 rows ready to train" in r.stdout
    calls = [sum(t["from"] == "function_call" for t in row["conversations"]) for row in glaive_rows()]
    results = sum(t["from"] == "observation" for row in glaive_rows() for t in row["conversations"])
    assert f"{sum(n > 0 for n in calls)} rows with calls, {sum(calls)} calls, {results} results" in r.stdout
    for path in (GLAIVE, OPENAI):
        r = cli_here("data", "preview", path, "-n", "1")
        assert r.returncode == 0, r.stderr
        assert "<tool_call>" in r.stdout and "<tool_response>" in r.stdout and "<tools>" in r.stdout
    r = cli_here("data", "check", OPENAI)
    assert r.returncode == 0 and "8 rows ready to train" in r.stdout, r.stderr


def sharegpt(*turns, tools_col=json.dumps([WEATHER[0]["function"]])) -> str:
    return json.dumps({"conversations": [{"from": f, "value": v} for f, v in turns], "tools": tools_col}) + "\n"


ASK, ANSWER, RESULT = ("human", "Weather in Paris?"), ("gpt", "21 C."), ("observation", '{"temp": 21}')
CALL = ("function_call", '{"name": "get_weather", "arguments": {"city": "Paris"}}')
BAD = {
    "call_json": (sharegpt(ASK, ("function_call", '{"name": "get_weather", "arguments": {city: "Paris"}}'), RESULT,
                           ANSWER), "line 1", "turn 2 (function_call): the call is not valid JSON", '"arguments"'),
    "openai_args": (json.dumps({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{'city': 'Paris'}"}}]},
        {"role": "tool", "content": "21"}, {"role": "assistant", "content": "21 C."}]}) + "\n",
        "line 1", "turn 2 (tool_calls): the arguments of 'get_weather' are not valid JSON"),
    "no_name": (sharegpt(ASK, ("function_call", '{"arguments": {}}'), RESULT, ANSWER), "turn 2",
                "without a function name"),
    "orphan_result": (sharegpt(ASK, RESULT, ANSWER), "line 1", "turn 2 is a tool result (observation)",
                      "a tool result must answer a function call"),
    "unanswered_call": (sharegpt(ASK, CALL, ANSWER), "turn 3 is an assistant answer", "followed by its result"),
    "ends_on_result": (sharegpt(ASK, CALL, RESULT), "line 1", "ends with a tool result"),
    "tools_json": (sharegpt(ASK, CALL, RESULT, ANSWER, tools_col="[{name: x}]"), "line 1",
                   "the tools column is not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_tool_rows_are_one_clear_line(name, tmp_path, smollm2):
    content, *needles = BAD[name]
    (tmp_path / f"{name}.jsonl").write_text(content)
    assert_user_error(cli_here("data", "check", tmp_path / f"{name}.jsonl"), f"{name}.jsonl", *needles)


def test_a_call_then_the_answer_in_a_later_turn_is_valid(tokenizer, tmp_path):
    """assistant -> tool -> assistant, twice, and a conversation may end on a call (training the call alone)."""
    path = tmp_path / "ok.jsonl"
    path.write_text(sharegpt(ASK, CALL, RESULT, ANSWER, ("human", "And Rome?"), CALL) + sharegpt(ASK, CALL))
    built = build(DataOptions(str(path)), tokenizer, 1024)
    assert [len(trained_spans(ex, tokenizer)) for ex in built.examples] == [3, 1]


def test_ollama_template_renders_tool_turns_like_apply_chat_template(tokenizer, go_render):
    """The Modelfile's TEMPLATE, through Go as Ollama runs it, gives the prompt training saw, tools and calls included,
    for every glaive row cut before each assistant turn."""
    t = tools.template_for(None, tokenizer)
    ollama = modelfile("m.gguf", t).split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    from speedtune.data import formats, sources

    src = sources.load(str(GLAIVE))
    cases = 0
    for rec in src.records[:12]:
        messages = formats.to_messages(rec, "sharegpt", {}, {})
        listed = tools.row_tools(rec.where, rec.data.get("tools"))
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                for convo in (messages[:i], [{"role": "system", "content": "Be brief."}, *messages[:i]]):
                    for tl in (listed, None):
                        ours = t.render(tokenizer, convo, add_generation_prompt=True, tools=tl)
                        assert go_render(ollama, convo, tl) == ours, (rec.where, i)
                        cases += 1
    assert cases > 100
