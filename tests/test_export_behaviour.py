"""The export's behaviour check: greedy answers of each GGUF against the merged model's, on the embedded model.

Both verdicts run on real files: the f16 GGUF of the session's run passes (its answers are the merged model's, token
for token), and a copy of it whose end-of-turn token can never be picked (its output row zeroed: the answer that never
stops, on every CPU) is flagged in the entry, the terminal table, the warning and the web page's table."""

import json
import shutil

import pytest
from conftest import assert_user_error, cli_here

from speedtune.exporting import behaviour as eb
from speedtune.exporting import gguf as export_gguf
from speedtune.paths import demo_dir


def _prompt(q):
    return eb.Prompt("generic", q, [1, 2, 3])


def _answer(ids, finish):
    return eb.Answer(ids, " ".join(map(str, ids)), finish)


def test_drift_is_an_answer_that_runs_on_where_the_merged_one_ends():
    items = [_prompt(q) for q in "abcde"]
    refs = [_answer([5, 6], "stop"), _answer([5, 6], "stop"), _answer([5, 6, 7], "stop"),
            _answer(list(range(64)), "length"), _answer([5], "stop")]
    got = [_answer([5, 6], "stop"),  # the same answer
           _answer([5, 9, 9], "stop"),  # another answer that ends: counted, not flagged
           _answer([5] * eb.gguf_limit(refs[2]), "length"),  # runs on: drift
           _answer(list(range(64)), "length"),  # both run to the limit, the same tokens
           _answer([4] + [5] * 10, "stop")]  # parts at once but ends: not flagged
    out = eb.compare(items, refs, got)
    assert (out["prompts"], out["matches"], out["merged_stops"], out["gguf_stops"], out["drifted"]) == (5, 2, 4, 3, 1)
    assert [a["drift"] for a in out["answers"]] == [False, False, True, False, False]
    assert [a["same_tokens"] for a in out["answers"]] == [2, 1, 1, 64, 0]
    assert eb.drifted(out) == [{"prompt": "c", "merged": "5 6 7", "gguf": " ".join(["5"] * 22), "merged_tokens": 3,
                                "gguf_tokens": 22}]
    assert eb.gguf_limit(refs[2]) == 2 * 3 + 16 and eb.gguf_limit(refs[3]) == eb.MAX_NEW_TOKENS


def test_gguf_auto_is_parsed(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from speedtune.exporting import gguf_tools

    from speedtune.commands import export

    assert gguf_tools.parse_quants("AUTO") == ["auto"]
    assert gguf_tools.estimate_bytes(10**8, ["auto"]) == gguf_tools.estimate_bytes(10**8, ["f16", "q8_0"])
    assert_user_error(cli_here("export", tmp_path, "--gguf", "auto,q8_0"), "--gguf auto,q8_0", "auto alone")
    seen = []
    monkeypatch.setattr(export, "export_run", lambda *a, **k: seen.append(k["gguf"]))
    for args in (["--gguf"], ["--gguf", "--ollama"], ["--gguf", "q8_0"], []):  # a bare --gguf means auto
        r = CliRunner().invoke(export.command, [str(tmp_path), *args])
        assert r.exit_code == 0, r.output
    assert seen == [["auto"], ["auto"], ["q8_0"], None]


@pytest.mark.slow
def test_gguf_auto_keeps_the_smallest_type_that_passes(real_run, tmp_path, monkeypatch):
    from speedtune.exporting.export import export_run

    # two rungs keep it short: q2_k is far too lossy for a 135M model, f16 passes
    monkeypatch.setattr(export_gguf, "AUTO_LADDER", ("q2_k", "f16"))
    report = export_run(real_run, tmp_path / "auto", gguf=["auto"])
    assert report["auto"]["picked"] == "f16" and [g["quant"] for g in report["gguf"]] == ["f16"]
    (rejected,) = report["auto"]["rejected"]
    assert rejected["quant"] == "q2_k" and not rejected["quality_ok"] and rejected["verdict"].startswith("too lossy")
    assert rejected["behaviour"] is None  # its agreement failed: no answers generated for it
    assert sorted(p.name for p in (tmp_path / "auto").glob("*.gguf")) == [f"{real_run.name}-f16.gguf"]
    saved = json.loads((tmp_path / "auto" / "export_report.json").read_text())
    assert saved["auto"]["picked"] == "f16" and saved["gguf"][0]["quality_ok"]


@pytest.fixture(scope="module")
def merged(real_run):
    """The session run merged in memory the way the export merges it, and the merged model's side of the check."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speedtune.inference.loader import run_base_model
    from speedtune.models.registry import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model(run_base_model(real_run)), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, real_run).merge_and_unload().eval()
    tok = AutoTokenizer.from_pretrained(real_run)
    return model, tok, eb.prepare(model, tok, real_run, is_run=True)


@pytest.mark.slow
def test_the_run_data_and_generic_prompts(merged):
    model, tok, check = merged
    sources = [p.source for p in check.items]
    assert sources.count("generic") == len(eb.GENERIC) and sources.count("training row") == eb.DATA_PROMPTS
    assert "training rows" in check.note
    rows = (demo_dir() / "identity.jsonl").read_text().splitlines()
    questions = {json.loads(line)["messages"][-2]["content"] for line in rows}
    assert all(p.question in questions for p in check.items if p.source == "training row")
    turn = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert all(len(p.ids) <= eb.MAX_PROMPT_TOKENS and p.ids[-len(turn):] == turn for p in check.items)
    assert check.stops == [2]
    # the embedded model ends its short answers: a GGUF that runs on has something to be measured against
    assert sum(r.finish == "stop" for r in check.refs) >= 3


@pytest.mark.slow
def test_f16_passes_and_a_gguf_that_never_ends_is_flagged(merged, exported, tmp_path):
    import gguf
    from rich.console import Console

    from speedtune.exporting.gguf import print_report
    from speedtune.ui.export_tab import verification_table

    model, tok, check = merged
    f16 = next(exported.glob("*-f16.gguf"))
    texts = export_gguf.HELD_OUT[:1]
    good = export_gguf.verify(model, tok, f16, "f16", texts, check)
    assert good["quality_ok"] and good["verdict"] == "ok" and good["drifted"] == []
    b = good["behaviour"]
    # measured: f16 gives the merged model's answers token for token (26 of 26 prompts); one near-tie allowed
    assert b["prompts"] == len(check.items) and b["matches"] >= b["prompts"] - 1
    assert b["gguf_stops"] == b["merged_stops"]

    broken = tmp_path / "noeos-f16.gguf"
    shutil.copy(f16, broken)
    reader = gguf.GGUFReader(broken, "r+")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")  # tied: also the output layer
    emb.data[2] = 0  # <|im_end|>'s logit is 0, under the top logit at every step: the answer never ends
    reader.data.flush()
    del reader
    bad = export_gguf.verify(model, tok, broken, "f16", texts, check)
    assert not bad["quality_ok"] and bad["verdict"].startswith("drifts")
    assert len(bad["drifted"]) == bad["behaviour"]["merged_stops"] == b["merged_stops"]
    first = next(a for a in b["answers"] if a["merged_finish"] == "stop")
    assert bad["drifted"][0]["prompt"] == first["prompt"] and bad["drifted"][0]["merged"] == first["merged"]
    assert bad["drifted"][0]["gguf_tokens"] == 2 * first["merged_tokens"] + 16

    report = {"output": str(tmp_path), "gguf": [good, bad]}
    json.dumps(report)  # what export_report.json holds
    console = Console(width=80, record=True, color_system=None)
    print_report(report, console)
    text = console.export_text()
    assert f"WARNING: {broken.name} drifts" in text and f"asked {first['prompt'][-60:]!r}" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("│") and ".gguf" in ln]
    n = b["merged_stops"]
    assert f"{b['prompts']}/{b['prompts']}" in rows[0] and f" {n}/{n} " in rows[0] and f" 0/{n} " in rows[1]
    html = verification_table(report)
    assert "drifts" in html and 'id="st-export-drift"' in html and first["merged"][:40] in html
