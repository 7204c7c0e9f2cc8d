import json

import pytest
from conftest import assert_user_error, cli_here

from speedtune.data import templates
from speedtune.data.dataset import DataOptions, build, stop_check
from speedtune.data.encode import IGNORE

CHAT = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(ex, tok):
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_chat_matches_apply_chat_template_and_masks_every_answer(tmp_path, tokenizer):
    built = build(DataOptions(str(write_jsonl(tmp_path / "c.jsonl", CHAT))), tokenizer, 512)
    ex = built.examples[0]
    msgs = CHAT[0]["messages"]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert full.startswith(ex.text) and full[len(ex.text):].strip() == ""  # same text, minus the trailing newline
    assert trained_text(ex, tokenizer) == "Hello.<|im_end|>4<|im_end|>"
    assert ex.input_ids[-1] == 2 and ex.input_ids.count(2) == 5  # ends with <|im_end|>; one per turn (5 turns)
    assert ex.input_ids.count(tokenizer.bos_token_id) == 5  # one <|im_start|> per turn, no extra BOS


@pytest.mark.parametrize("name", ["chatml", "llama-3", "zephyr", "mistral", "alpaca"])
def test_named_templates_render_like_apply_chat_template(name, tmp_path, tokenizer):
    if name == "llama-3":
        with pytest.raises(Exception, match="not one token"):
            templates.named(name, tokenizer)
        return
    t = templates.named(name, tokenizer)
    built = build(DataOptions(str(write_jsonl(tmp_path / "c.jsonl", CHAT)), template=name), tokenizer, 512)
    ex = built.examples[0]
    full = tokenizer.apply_chat_template(CHAT[0]["messages"], chat_template=t.jinja, tokenize=False)
    assert full.startswith(ex.text)
    assert trained_text(ex, tokenizer).count(t.eot) == 2
    assert ex.input_ids[-1] == tokenizer.convert_tokens_to_ids(t.eot)


def test_own_template_is_recognised_as_chatml_with_its_default_system(tokenizer):
    t = templates.own(tokenizer)
    assert t.eot == "<|im_end|>"
    assert t.default_system.startswith("You are a helpful AI assistant named SmolLM")
    assert t.ollama and "<|im_start|>" in t.ollama


def test_alpaca_rows_and_hand_added_eos(tmp_path, tokenizer):
    rows = [{"instruction": "Add", "input": "2 and 2", "output": "4<|im_end|>"},
            {"instruction": "Say hi", "input": "", "output": "hi"}]
    built = build(DataOptions(str(write_jsonl(tmp_path / "a.jsonl", rows)), template="alpaca"), tokenizer, 512)
    assert built.format == "alpaca"
    a, b = built.examples
    assert "### Instruction:\nAdd\n\n2 and 2\n\n### Response:\n4<|im_end|>" in a.text
    assert a.text.count("<|im_end|>") == 1 and built.fixed  # the hand-added EOS was removed, not doubled
    assert trained_text(b, tokenizer) == "hi<|im_end|>"


def test_sharegpt_csv_parquet_folder_and_columns(tmp_path, tokenizer):
    sg = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    assert build(DataOptions(str(write_jsonl(tmp_path / "s.jsonl", sg))), tokenizer, 256).format == "sharegpt"
    (tmp_path / "med.csv").write_text("Patient,Doctor\nI have a cough,Drink water\n")
    built = build(DataOptions(str(tmp_path / "med.csv"), columns="user=Patient,assistant=Doctor"), tokenizer, 256)
    assert trained_text(built.examples[0], tokenizer) == "Drink water<|im_end|>"
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": "Q1", "answer": "A1"}]), folder / "p.parquet")
    (folder / "more.json").write_text(json.dumps([{"question": "Q2", "answer": "A2"}]))
    built = build(DataOptions(str(folder), columns="instruction=question,output=answer"), tokenizer, 256)
    assert len(built.examples) == 2 and built.format == "alpaca"


def test_text_format_and_train_on_all(tmp_path, tokenizer):
    built = build(DataOptions(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}]))), tokenizer, 64)
    ex = built.examples[0]
    assert ex.input_ids[-1] == tokenizer.eos_token_id and ex.n_trained == len(ex.input_ids)
    built = build(DataOptions(str(write_jsonl(tmp_path / "c.jsonl", CHAT)), train_on="all"), tokenizer, 512)
    assert built.examples[0].n_trained == len(built.examples[0].input_ids)


def test_llamafactory_dataset_info(tmp_path, tokenizer):
    write_jsonl(tmp_path / "tqa.jsonl", [{"q": "Hello", "a": "Hi, I am XX."}])
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"TQA_en": {"file_name": "tqa.jsonl", "columns": {"prompt": "q", "response": "a"}}}))
    built = build(DataOptions(f"{tmp_path}/dataset_info.json:TQA_en"), tokenizer, 256)
    assert trained_text(built.examples[0], tokenizer) == "Hi, I am XX.<|im_end|>"


def test_stop_check_adds_the_end_of_turn_to_generation(tokenizer):
    from transformers import GenerationConfig

    t = templates.own(tokenizer)
    assert stop_check(t, tokenizer, GenerationConfig(eos_token_id=2)) == ([2], None)
    ids, warning = stop_check(t, tokenizer, GenerationConfig(eos_token_id=1))
    assert ids == [1, 2] and "<|im_end|>" in warning


BAD = {
    "malformed.jsonl": ('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', [], "line 2", "not valid JSON"),
    "missing_col.jsonl": ('{"question": "a", "answer": "b"}\n', [], "can't tell the data format", "--columns"),
    "misnamed.jsonl": ('{"instruction": "a", "outptu": "b"}\n', ["--format", "alpaca"], "needs a 'output' column",
                       "--columns output="),
    "mapped.csv": ("Patient,Doctor\nx,y\n", ["--columns", "user=Patient,assistant=Medic"], "column 'Medic'",
                   "mapped.csv line"),
    "empty.jsonl": ("", [], "empty.jsonl", "empty"),
    "empty_answer.jsonl": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n',
                           [], "line 1", "empty assistant turn"),
    "two_users.jsonl": ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n', [],
                        "line 1", "two user turns in a row"),
    "bad_role.jsonl": ('{"messages": [{"role": "wizard", "content": "a"}]}\n', [], "line 1", "unknown role 'wizard'"),
    "template.jsonl": ('{"instruction": "a", "output": "b"}\n', ["--template", "nope"], "unknown template 'nope'",
                       "chatml"),
    "long.jsonl": ('{"instruction": "a", "output": "' + "word " * 200 + '"}\n', ["--seq-len", "64"], "line 1",
                   "longer than --seq-len 64"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_are_one_clear_line(name, tmp_path, smollm2):
    content, flags, *needles = BAD[name]
    (tmp_path / name).write_text(content)
    assert_user_error(cli_here("data", "check", tmp_path / name, *flags), *needles)


def test_missing_file(smollm2):
    assert_user_error(cli_here("data", "check", "nowhere/data.jsonl"), "data file not found: nowhere/data.jsonl")


def test_check_summary_and_drop_bad(tmp_path, smollm2):
    rows = [CHAT[0], {"messages": [{"role": "user", "content": "x"}]}, CHAT[0]]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert_user_error(cli_here("data", "check", path), "mixed.jsonl line 2", "ends with a user turn")
    r = cli_here("data", "check", path, "--drop-bad")
    assert r.returncode == 0, r.stderr
    assert "dropped 1 of 3 rows" in r.stdout and "2 rows ready" in r.stdout and "rows" in r.stdout


def test_preview_shows_special_tokens_and_counts(smollm2):
    from speedtune.paths import demo_dir

    r = cli_here("data", "preview", demo_dir() / "identity.jsonl", "-n", "2")
    assert r.returncode == 0, r.stderr
    assert "<|im_start|>" in r.stdout and "<|im_end|>" in r.stdout and "trained" in r.stdout


def test_utf8_files_that_used_to_break_load(tmp_path):
    """A BOM (Excel's "CSV UTF-8", Notepad), a CSV field longer than the csv module's default limit (a long
    document), a line separator (U+2028) inside a JSON string: all ordinary UTF-8 data."""
    from speedtune.data.sources import load

    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "output": "b"}]).encode())
    assert load(str(tmp_path / "bom.json")).records[0].data == {"instruction": "a", "output": "b"}
    long = "word " * 40_000
    (tmp_path / "long.csv").write_text(f"instruction,output\nsummarise,{long}\nnext,short\n", encoding="utf-8")
    rows = load(str(tmp_path / "long.csv")).records
    assert len(rows) == 2 and rows[0].data["output"] == long and rows[1].where.endswith("long.csv line 3")
    (tmp_path / "sep.jsonl").write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n{bad\n",
                                        encoding="utf-8")
    with pytest.raises(Exception, match="sep.jsonl line 2: not valid JSON"):
        load(str(tmp_path / "sep.jsonl"))


def test_batched_rows_match_one_by_one_and_the_first_bad_row_fails(tokenizer):
    from speedtune.data.encode import encode, encode_many
    from speedtune.errors import RowError

    tpl = templates.load(None, tokenizer)
    convs = [[{"role": "user", "content": f"q{i} " * (i + 1)}, {"role": "assistant", "content": f"a{i} " * (2 * i + 1)}]
             for i in range(7)]
    convs[2] = [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "x"}]  # > seq_len 128
    convs[5] = CHAT[0]["messages"]
    rows = [(f"row {i}", lambda c=c: (c, None)) for i, c in enumerate(convs)]
    got = [ex for ex, _, _ in encode_many(rows, tokenizer, tpl, 128, batch=3)]  # batches of 3, 3 and 1
    for i, (c, ex) in enumerate(zip(convs, got)):
        if i == 2:
            assert isinstance(ex, RowError) and ex.where == "row 2" and "longer than --seq-len 128" in ex.reason
            continue
        one = encode(c, tokenizer, tpl, 128, f"row {i}")
        assert (ex.input_ids, ex.labels, ex.spans, ex.text) == (one.input_ids, one.labels, one.spans, one.text)
    assert trained_text(got[5], tokenizer) == "Hello.<|im_end|>4<|im_end|>"


def test_the_first_bad_row_is_the_one_named(tmp_path, tokenizer):
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(1100)]
    rows[300]["output"] = "word " * 2000  # too long: found once tokenised, after row 401's fault is read
    rows[400]["output"] = ""  # in the same batch of 512
    rows[1050]["output"] = ""  # and in the next one
    with pytest.raises(Exception, match="line 301: 20"):
        build(DataOptions(str(write_jsonl(tmp_path / "a.jsonl", rows))), tokenizer, 512)
    built = build(DataOptions(str(tmp_path / "a.jsonl"), drop_bad=True), tokenizer, 512)
    assert [(w.split()[-1], "longer" in why) for w, why in built.dropped] == [("301", True), ("401", False), ("1051", False)]
    assert len(built.examples) == 1097
