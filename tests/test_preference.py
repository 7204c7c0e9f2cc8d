"""Preference training (`--method dpo|orpo`): the pair forms, their encoding, the errors, and real runs on the CPU
(the embedded SmolLM2 where the reward margin has to rise; the tiny model where only the plumbing is tested).
The pairs are a slice of LLaMA-Factory's dpo_en_demo (speedtune/demo/dpo-pairs.jsonl, Apache-2.0)."""

import json
import os
import subprocess

import pytest
import yaml
from conftest import assert_user_error, cli, cli_here, kill_after_checkpoint

from speedtune.data.dataset import DataOptions, build
from speedtune.errors import UserError
from speedtune.paths import demo_dir

PAIRS = demo_dir() / "dpo-pairs.jsonl"
ROWS = [json.loads(line) for line in PAIRS.read_text().splitlines()]
SHORTEST = sorted(ROWS, key=lambda r: len(json.dumps(r)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ranking_entry(tmp_path, rows):
    """The rows as LLaMA-Factory keeps them: a file and its dataset_info.json entry (`ranking: true`)."""
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"demo": {
        "file_name": "pairs.jsonl", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}))
    return f"{tmp_path / 'dataset_info.json'}:demo"


def test_every_pair_form_encodes_the_same_ids_as_sft_would(tokenizer, tmp_path):
    q, good, bad = "Name a colour.", "Blue.", "I can't help with that."
    forms = {
        "ranking": [{"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": good},
                     "rejected": {"from": "gpt", "value": bad}}],
        "alpaca ranking": [{"instruction": q, "input": "", "chosen": good, "rejected": bad}],
        "strings": [{"prompt": q, "chosen": good, "rejected": bad}],
        "conversational": [{"prompt": [{"role": "user", "content": q}],
                            "chosen": [{"role": "assistant", "content": good}],
                            "rejected": [{"role": "assistant", "content": bad}]}],
        "implicit": [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                      "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}]}],
        "hand-added eos": [{"prompt": q, "chosen": good + "<|im_end|>", "rejected": bad}],
    }
    seen = {}
    for name, rows in forms.items():
        built = build(DataOptions(str(write_jsonl(tmp_path / f"{name}.jsonl", rows))), tokenizer, 256)
        [ex] = built.examples
        assert built.format.startswith("preference/")
        seen[name] = (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids)
    seen["dataset_info"] = (lambda ex: (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids))(
        build(DataOptions(ranking_entry(tmp_path, forms["ranking"])), tokenizer, 256).examples[0])
    assert len(set(map(str, seen.values()))) == 1, seen  # one pair, whatever the form
    prompt, chosen, rejected = seen["ranking"]
    sft = build(DataOptions(str(write_jsonl(tmp_path / "sft.jsonl", [{"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": good}]}]))), tokenizer, 256).examples[0]
    assert prompt + chosen == sft.input_ids  # the chosen sequence is exactly SFT's row
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")  # the template's generation prompt
    eos = tokenizer.eos_token_id
    assert chosen[-1] == eos and rejected[-1] == eos and chosen.count(eos) == rejected.count(eos) == 1
    assert tokenizer.decode(chosen) == good + "<|im_end|>" and tokenizer.decode(rejected) == bad + "<|im_end|>"


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "Q?", "chosen": "A."}, "no 'rejected' answer"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "A."}, "the same answer"),
    ({"prompt": "Q?", "chosen": "", "rejected": "B."}, "empty 'chosen'"),
    ({"prompt": "Q?", "chosen": {"from": "human", "value": "A."}, "rejected": "B."}, "'human' turn"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}, "share no"),
])
def test_a_bad_pair_is_a_row_error_naming_the_row(row, needle, tokenizer, tmp_path):
    good = {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."} if "prompt" in row else \
        {k: [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a}] for k, a in
         (("chosen", "Yes."), ("rejected", "No."))}  # the file's form is read from its first row
    path = write_jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(UserError, match=needle) as e:
        build(DataOptions(str(path)), tokenizer, 256)
    assert "p.jsonl line 2" in str(e.value)
    dropped = build(DataOptions(str(path), drop_bad=True), tokenizer, 256)  # --drop-bad keeps the good row
    assert len(dropped.examples) == 1 and dropped.dropped[0][0].endswith("line 2")


def test_data_check_and_preview_show_the_pairs(smollm2, tmp_path):
    spec = ranking_entry(tmp_path, ROWS[:3])
    r = cli_here("data", "check", spec)
    assert r.returncode == 0, r.stderr
    assert "preference/sharegpt" in r.stdout and "3 preference pairs ready for --method dpo or orpo" in r.stdout
    r = cli_here("data", "preview", spec, "-n", "1")
    assert r.returncode == 0, r.stderr
    assert "── chosen (" in r.stdout and "── rejected (" in r.stdout
    assert ROWS[0]["chosen"]["value"][:30] in r.stdout.replace("\n", " ").replace("│", "")
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"conversations": ROWS[1]["conversations"],
                                                         "chosen": ROWS[1]["chosen"]}])
    assert_user_error(cli_here("data", "check", bad), "bad.jsonl line 2", "no 'rejected' answer")


def test_method_and_data_must_agree(tiny_model, tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", SHORTEST[:2])
    base = ["train", "--model", tiny_model, "--max-steps", "1", "--seq-len", "256"]
    assert_user_error(cli_here(*base, "--data", pairs, "--output", tmp_path / "a"), "preference data",
                      "--method dpo or orpo")
    assert_user_error(cli_here(*base, "--data", demo_dir() / "identity.jsonl", "--method", "orpo", "--output",
                          tmp_path / "b"), "--method orpo trains on preference pairs")
    assert_user_error(cli_here(*base, "--data", pairs, "--method", "kto"), "--method", "kto")
    assert_user_error(cli_here(*base, "--data", pairs, "--beta", "0.2"), "--beta is for preference training")
    assert_user_error(cli_here(*base, "--data", pairs, "--method", "dpo", "--beta", "0"), "--beta must be positive")
    assert_user_error(cli_here(*base, "--data", pairs, "--method", "dpo", "--step-graphs"), "--step-graphs is for "
                      "--method sft")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def train_pairs(model, data, out, method, steps, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--method", method, "--max-steps", str(steps),
            "--output", str(out), "--seq-len", "256", "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "0",
            *map(str, extra)]


def logged(out, key):
    return [e[key] for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
            if e["event"] == "step" and key in e]


@pytest.mark.slow
@pytest.mark.parametrize("method, key", [("dpo", "rewards/margins"), ("orpo", "log_odds_ratio")])
def test_preference_training_raises_the_margin(method, key, smollm2, tmp_path):
    """The embedded model on the two shortest demo pairs (both in every step): the chosen answer's margin over the
    rejected one grows. DPO's reward margin starts at exactly 0 (the policy is the reference before its first
    update). Measured (2026-12-05, this CPU, 3 steps): DPO's margin 0 -> 3.14 -> 5.54, ORPO's log-odds ratio
    -0.684 -> -0.611 -> -0.558: the mean of the last two is 0.10 or more above the first where 0.05 is asked for."""
    out = tmp_path / method
    r = cli_here(*train_pairs("smollm2-135m", write_jsonl(tmp_path / "p.jsonl", SHORTEST[:2]), out, method, 3,
                              "--lr", "2e-3"))
    assert r.returncode == 0, r.stderr
    values = logged(out, key)
    assert len(values) == 3
    late = sum(values[-2:]) / 2
    assert late > values[0] + 0.05, values
    m = json.loads((out / "metrics.json").read_text())
    if method == "dpo":  # exactly 0 in fp32; bf16 (a CPU with AMX) rounds the policy's and the reference's passes
        # differently (measured 2026-12-05 on an AMX Xeon: -0.020)
        bf16 = yaml.safe_load((out / "run_config.yaml").read_text())["plan"]["dtype"] == "bfloat16"
        assert abs(values[0]) < (0.05 if bf16 else 1e-6) and logged(out, "rewards/accuracies")[-1] == 1.0, values
    assert m["method"] == method and m["preference"][key]["last"] == values[-1] and m["tokens_per_s"] > 0
    assert (out / "loss.png").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "ref").exists()  # no second adapter: DPO's reference is the adapter switched off
    if method == "dpo":  # 3 steps of both pairs: each pair's reference log-probs computed once, before training

        reasons = yaml.safe_load((out / "run_config.yaml").read_text())["plan"]["reasons"]
        assert any("computed once per pair before training: the run draws 6 rows from 2 pairs" in r for r in reasons)


@pytest.mark.slow
def test_dpo_resumes_after_a_kill_and_exports(tiny_model, tmp_path):
    out = tmp_path / "run"
    data = write_jsonl(tmp_path / "p.jsonl", SHORTEST[:8])
    # killed once a checkpoint of step 4 is on disk (a step takes about a second: the run is far from its end)
    saved = kill_after_checkpoint(train_pairs(tiny_model, data, out, "dpo", 12, "--save-steps", 2), out)
    assert saved and not (out / "metrics.json").exists()
    r = cli_here(*train_pairs(tiny_model, data, out, "dpo", 12, "--save-steps", 2, "--resume"))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 12 and m["method"] == "dpo"
    assert m["loss"][0]["step"] > 1 and "rewards/margins" in m["loss"][0]  # it continued, and logs the margins

    assert yaml.safe_load((out / "run_config.yaml").read_text())["asked"]["method"] == "dpo"
    r = cli_here("export", out, "--merged", "16bit", "--output", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    import torch
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged-16bit", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)  # the DPO adapter, merged


def test_the_api_trains_with_a_method(tiny_model, tmp_path):
    import speedtune as st

    run = st.train(model=str(tiny_model), data=str(write_jsonl(tmp_path / "p.jsonl", SHORTEST[:6])), method="orpo",
                   max_steps=2, batch_size=2, grad_accum=1, seq_len=256, output=str(tmp_path / "run"), progress=False,
                   eval_split=0.34, eval_steps=1)
    assert run.metrics["method"] == "orpo" and run.metrics["steps"] == 2 and run.metrics["train_rows"] == 4
    assert [e["step"] for e in run.metrics["eval"]] == [1, 2]  # the held-out pairs' loss and log-odds
    assert "log_odds_ratio" in run.metrics["eval"][-1]
    assert [s["step"] for s in run.metrics["loss"]] == [1, 2] and "log_odds_ratio" in run.metrics["loss"][-1]
    assert run.plan["data"]["method"] == "orpo" and any("ORPOTrainer" in r for r in run.plan["reasons"])


def test_the_web_pages_train_tab_offers_the_method():
    from speedtune.ui import train_tab

    values = ["smollm2-135m", "", str(PAIRS), "auto", "", "", "responses", False, 256, "/tmp/run", "steps", 5, 1,
              5e-6, 16, 16, 2, 1, "auto", "auto", "auto", False]
    assert "--method" not in train_tab.cli_args(*values)  # sft: the default, no flag
    args = train_tab.cli_args(*values, "dpo")
    assert args[args.index("--method") + 1] == "dpo"
    assert "speedtune train" in train_tab.summary(*values, "orpo") and "--method orpo" in train_tab.summary(
        *values, "orpo")
    from speedtune.commands.train import command  # the page's command line is one `speedtune train` parses

    assert command.make_context("train", list(args)).params["method"] == "dpo"
    pytest.importorskip("gradio")  # the `ui` extra
    from speedtune.ui import app

    [menu] = [c for c in app.build().blocks.values() if getattr(c, "elem_id", None) == "train-method"]
    assert [c[1] for c in menu.choices] == ["sft", "dpo", "orpo"] and menu.value == "sft"


def test_the_web_pages_data_tab_shows_both_sequences_of_a_pair(smollm2):
    from speedtune.ui.data_tab import load_data

    status, summary, preview = load_data("smollm2-135m", "", str(PAIRS), "auto", "", None, "responses", False, 512, 1)
    assert "preference/sharegpt" in status and "(chosen)" in preview and "(rejected)" in preview
    assert preview.count('class="st-example"') == 2


def test_the_preference_bench_suites_load_and_bad_ones_are_one_line(tmp_path):
    from speedtune.benchmarking.suite import load_suite

    for name in ("smollm2-135m-dpo", "llama-3-8b-dpo"):
        suite = load_suite(str(demo_dir().parent.parent / "benchmarks" / f"{name}.yaml"), {})
        assert suite.method == "dpo" and {"trl", "unsloth-dpo", "speedtune"} <= {r["name"] for r in suite.runs}
    with pytest.raises(UserError, match="method 'kto' is not one of sft, dpo, orpo"):
        load_suite(None, {"method": "kto", "data": str(PAIRS)})
    with pytest.raises(UserError, match="needs `data` .* and no `eval_data`"):
        load_suite(None, {"method": "dpo", "data": str(PAIRS), "eval_data": str(PAIRS)})
    with pytest.raises(UserError, match="suite-wide setting"):
        load_suite(None, {"method": "dpo", "data": str(PAIRS), "runs": [{"name": "a", "method": "orpo"}]})


@pytest.mark.slow
def test_bench_smoke_trains_the_same_pairs_in_speedtune_and_trl(tmp_path):
    """The harness with `--method dpo`: speedtune train's DPO (the smoke suite's reference run, PEFT backend) and TRL's
    own DPOTrainer train the same pairs in the same order, so their per-step losses and reward margins agree (the
    suite's third run, speedtune's fit, plans the same passes on a CPU: left out here)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", SHORTEST[:16])
    env = {"SPEEDTUNE_BENCH_WORKDIR": str(tmp_path / "work")}
    r = cli_here("bench", "--smoke", "--method", "dpo", "--data", data, "--runs", "peft,trl", "--results",
                 tmp_path / "res", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    [report] = (tmp_path / "res").glob("*.json")
    rep = json.loads(report.read_text())
    by = {x["name"]: x for x in rep["results"]}
    assert set(by) == {"peft", "trl"} and "TRL DPOTrainer" in by["trl"]["label"]
    for x in by.values():
        assert x["method"] == "dpo" and x["real_tokens"] == by["trl"]["real_tokens"] > 0 and x["rows"] == 16
        assert x["losses"] == pytest.approx(by["trl"]["losses"], rel=1e-5)
        margins = x["preference_curve"]["rewards/margins"]
        assert len(margins) == 4 and margins[0] == 0  # the policy is the reference before its first update
        assert margins == pytest.approx(by["trl"]["preference_curve"]["rewards/margins"], abs=1e-5)
    assert rep["loss_check"]["failures"] == []


def test_a_multi_turn_prompt_keeps_its_earlier_answers_in_the_prompt(tokenizer, tmp_path):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"}],
           "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5, I think."}}
    [ex] = build(DataOptions(str(write_jsonl(tmp_path / "p.jsonl", [row]))), tokenizer, 256).examples
    prompt = tokenizer.decode(ex.prompt_ids)
    assert "Be brief." in prompt and "Hello!<|im_end|>" in prompt and prompt.endswith("2+2?<|im_end|>\n"
                                                                                       "<|im_start|>assistant\n")
    assert tokenizer.decode(ex.chosen_ids) == "4<|im_end|>"
    assert tokenizer.decode(ex.rejected_ids) == "5, I think.<|im_end|>"


@pytest.mark.slow
def test_two_processes_train_the_same_dpo_steps_as_one(tiny_model, tmp_path):
    """Data parallel (torchrun, gloo on the CPU): each rank one pair of a step's two; TRL's trainer averages the ranks'
    gradients, so the steps are one process's."""
    from speedtune.training import distributed

    data = write_jsonl(tmp_path / "p.jsonl", SHORTEST[:6])
    args = train_pairs(tiny_model, data, tmp_path / "one", "dpo", 3, "--lr", "1e-3", "--precision", "fp32")
    assert cli_here(*args).returncode == 0
    two = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in args]
    r = subprocess.run(distributed.launch_command(2, two), env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    one, both = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert both["processes"] == 2 and len(both["loss"]) == 3
    assert [s["loss"] for s in both["loss"]] == pytest.approx([s["loss"] for s in one["loss"]], rel=1e-5)
