import json
from pathlib import Path

import pytest
from conftest import assert_user_error, cli_here

from speedtune.benchmarking import report as bench_report
from speedtune.benchmarking.suite import with_processes

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "dpo-en-demo-chosen-train.jsonl"


@pytest.fixture(scope="module")
def short_rows(tokenizer):
    """Real single-turn rows of the shipped demo data that fit the smoke suite's 256 tokens, as Alpaca dicts."""
    from speedtune.data.dataset import DataOptions, build

    rows = [json.loads(x) for x in DATA.read_text().splitlines()]
    built = build(DataOptions(str(DATA)), tokenizer, 100000)
    fit = [r for r, e in zip(rows, built.examples) if len(e.input_ids) <= 240
           and [m["role"] for m in r["messages"]] == ["user", "assistant"]]
    return [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
            for r in fit]


@pytest.mark.slow
def test_bench_smoke_on_a_pretty_printed_json_array(tmp_path, short_rows):
    """`--data` takes any file `speedtune train` reads: here a pretty-printed JSON array, as LLaMA-Factory ships its
    datasets. The smoke suite proves the harness (a fresh process per run, the same rows in the same order, the
    report, the checks), not the numbers: vanilla PEFT through speedtune train, speedtune's fit, and TRL's own
    SFTTrainer (the Unsloth baselines' worker without Unsloth) train the same steps."""
    assert len(short_rows) >= 20
    pretty = tmp_path / "alpaca_demo.json"
    pretty.write_text(json.dumps(short_rows[:16], indent=2))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in short_rows[16:20]))
    env = {"SPEEDTUNE_BENCH_WORKDIR": str(tmp_path / "work")}
    r = cli_here("bench", "--smoke", "--data", pretty, "--eval-data", held, "--results", tmp_path / "res", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    [report] = (tmp_path / "res").glob("*-tiny-alpaca-demo-seq256-fp32.json")
    rep = json.loads(report.read_text())
    assert rep["device"] and rep["fairness"] and rep["data"] == str(pretty)
    by = {x["name"]: x for x in rep["results"]}
    assert set(by) == {"peft", "speedtune", "trl"}
    peft, fast, trl = by["peft"], by["speedtune"], by["trl"]
    assert peft["layout"] == "rows" and peft["gradient_checkpointing"] is True and peft["passes_per_step"] == 2
    assert fast["layout"] == "tokens" and fast["passes_per_step"] <= 2 and fast["label_logits"]
    assert trl["kind"] == "trl" and (trl["micro_batch"], trl["grad_accum"]) == (2, 2) and "TRL" in trl["label"]
    for x in by.values():
        assert x["real_tokens_per_s"] > 0 and x["s_per_step"] > 0 and x["time_to_adapter_s"] > 0
        assert len(x["losses"]) == len(x["grad_norms"]) == 4 and x["rows"] == 16 and x["seed"] == 3407
        assert x["real_tokens"] == peft["real_tokens"] > 0  # the same rows in every step
        assert [p["step"] for p in x["eval_curve"]] == [2, 4]
        assert x["final_eval_loss"] == pytest.approx(peft["final_eval_loss"], rel=1e-4)
    for x in (fast, trl):  # the same math on the CPU in fp32, whichever trainer
        assert x["loss_check"] == "pass" and x["max_rel_loss_diff"] < 1e-5 and x["max_rel_grad_norm_diff"] < 1e-4
    assert rep["loss_check"]["failures"] == [] and rep["loss_check"]["reference"] == "peft"
    assert rep["speedtune_vs_peft"] == fast["real_tokens_per_s"] / peft["real_tokens_per_s"]
    md = report.with_suffix(".md").read_text()
    assert md.startswith("# tiny") and "| what it is |" in md and "peak reserved GB" in md and "passed" in md
    assert report.with_suffix(".png").stat().st_size > 1000
    assert report.with_name(report.stem + "-eval.png").stat().st_size > 1000
    # the same suite again, one run only, reusing the others' results
    r = cli_here("bench", "--smoke", "--data", pretty, "--eval-data", held, "--runs", "speedtune", "--resume",
                 "--results", tmp_path / "res2", env=env)
    assert r.returncode == 0, r.stderr
    assert "peft: reusing its result" in " ".join((r.stdout + r.stderr).split())
    # runs made in several calls: --report-only reports the finished results and runs nothing
    (tmp_path / "work" / "result-trl.json").unlink()
    finished = json.loads((tmp_path / "work" / "result-speedtune.json").read_text())
    r = cli_here("bench", "--smoke", "--data", pretty, "--eval-data", held, "--report-only", "--results",
                 tmp_path / "res3", env=env)
    assert r.returncode == 0, r.stderr
    [again] = (tmp_path / "res3").glob("*.json")
    rep = json.loads(again.read_text())
    assert [x["name"] for x in rep["results"]] == ["peft", "speedtune"] and rep["not_run"] == ["trl"]
    assert rep["results"][1]["real_tokens_per_s"] == finished["real_tokens_per_s"]  # its result, not a new run
    assert not (tmp_path / "work" / "result-trl.json").exists()


@pytest.mark.slow
def test_a_failing_run_exits_non_zero_with_its_one_line_error(tmp_path):
    """Each run's output goes to its log; the command names the runs that failed, their errors in one line each, and
    exits non-zero, with no traceback on the terminal (the traceback is in the run's log)."""
    suite = tmp_path / "s.yaml"
    suite.write_text("runs:\n  - {name: graphs, backend: peft, fit: auto, step_graphs: true}\n"
                     "  - {name: optim, backend: peft, fit: 'off', optim: no_such_optimizer}\n")
    r = cli_here("bench", suite, "--smoke", "--results", tmp_path / "res",
                 env={"SPEEDTUNE_BENCH_WORKDIR": str(tmp_path / "work")})
    line = assert_user_error(r, "run graphs failed: --step-graphs needs a CUDA GPU",
                             "run optim failed: ValueError: ", "no_such_optimizer")
    assert "Traceback" not in r.stdout
    assert "Traceback" in (tmp_path / "work" / "log-optim.txt").read_text()
    assert str(tmp_path / "work" / "log-optim.txt") in line
    [md] = (tmp_path / "res").glob("*.md")
    assert "| graphs |" in md.read_text() and "failed: --step-graphs needs a CUDA GPU" in md.read_text()


def test_a_row_longer_than_seq_len_is_one_line_before_any_run(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n" +
                    json.dumps({"instruction": "Write a long answer.", "output": " ".join(["word"] * 400)}) + "\n")
    work = tmp_path / "work"
    r = cli_here("bench", "--smoke", "--data", data, "--seq-len", 64, env={"SPEEDTUNE_BENCH_WORKDIR": str(work)})
    assert_user_error(r, f"{data} line 2:", "longer than --seq-len 64")
    assert not list(work.glob("log-*.txt"))  # no run was spawned


@pytest.mark.slow
def test_bench_bad_suite(tmp_path):
    bad = tmp_path / "s.yaml"
    for text, says, *flags in [
        ("shape: llama-9\n", "unknown shape 'llama-9'"),
        ("seqlen: 5\n", "unknown key(s) seqlen"),
        ("shape: [unclosed\n", "not valid YAML"),
        ("memory_cap_gb: .nan\n", "memory_cap_gb must be a finite number"),
        ("runs:\n  - {name: a, backend: peft, lrr: 0.1}\n", "run a: unknown or suite-wide setting(s) lrr"),
        ("runs:\n  - {name: a, kind: unsloth-fast}\n", "kind 'unsloth-fast' is not one of speedtune, unsloth-tutorial"),
        ("runs:\n  - {name: a, kind: unsloth-tutorial, batch_size: 8}\n",
         "run a (unsloth-tutorial): can't set batch_size", "--smoke"),
    ]:
        bad.write_text(text)
        assert_user_error(cli_here("bench", bad, *flags), says)
    assert_user_error(cli_here("bench", "--smoke", "--runs", "fastest"), "no run named fastest")
    assert_user_error(cli_here("bench", "--smoke", "--lengths", tmp_path / "none.txt"), "length profile not found")
    assert_user_error(cli_here("bench", "--smoke", "--data", tmp_path / "none.json"), "data file not found")
    assert_user_error(cli_here("bench", "--smoke", "--memory-cap-gb", "inf"), "--memory-cap-gb must be a finite number")


def test_ratios_come_from_the_runs():
    rep = {"results": [{"name": "peft", "real_tokens_per_s": 100.0, "peak_alloc_gb": 8.0, "peak_reserved_gb": 10.0},
                       {"name": "unsloth", "real_tokens_per_s": 250.0, "peak_alloc_gb": 6.0, "peak_reserved_gb": 6.0},
                       {"name": "speedtune", "real_tokens_per_s": 400.0, "peak_alloc_gb": 10.0,
                        "peak_reserved_gb": 12.0},
                       {"name": "speedtune-12gb", "real_tokens_per_s": 300.0, "peak_alloc_gb": 7.5}]}
    bench_report.summarise(rep)
    assert rep["speedtune_12gb_vs_unsloth"] == 1.2 and rep["speedtune_12gb_memory_vs_peft"] == 0.75
    assert rep["speedtune_vs_unsloth"] == 1.6 and rep["speedtune_vs_peft"] == 4.0 and rep["unsloth_vs_peft"] == 2.5
    assert rep["speedtune_memory_vs_peft"] == 1.2 and rep["results"][1]["memory_vs_peft"] == 0.6  # on reserved


def _run(name, kind, tps, kernel, reserved, adapter):
    return {"name": name, "kind": kind, "real_tokens_per_s": tps, "gpu_kernel_s_per_1k_tokens": kernel,
            "peak_reserved_gb": reserved, "peak_alloc_gb": reserved * 0.8, "time_to_adapter_s": adapter}


def test_the_headline_is_against_the_best_unsloth_run_and_its_tutorial():
    runs = [_run("unsloth-tutorial", "unsloth-tutorial", 1000.0, 0.40, 7.0, 150.0),
            _run("unsloth-tuned", "unsloth-tuned", 4000.0, 0.20, 16.0, 60.0),
            _run("unsloth-slow", "unsloth-tuned", 3000.0, 0.25, 12.0, 55.0),
            _run("speedtune", "speedtune", 8000.0, 0.10, 20.0, 33.0)]
    rep = {"suite": {"headline": "speedtune"}, "results": runs}
    bench_report.summarise(rep)
    assert rep["unsloth_best"] == "unsloth-tuned" and rep["speedtune_vs_unsloth_best"] == 2.0
    assert rep["speedtune_vs_unsloth_tutorial"] == 8.0
    assert rep["unsloth_soonest_adapter"] == "unsloth-slow" and rep["speedtune_time_to_adapter_vs_unsloth_best"] == 0.6
    assert rep["speedtune_reserved_vs_unsloth_best"] == 1.25
    assert "t4_kernel_ratio_vs_unsloth_best" not in rep  # not the T4 proxy
    # the T4 proxy: fp16 under 15 GB reserved; the best kernel time among the Unsloth runs that stayed within it
    t4 = {"suite": {"headline": "speedtune", "precision": "fp16", "memory_cap_gb": 15},
          "results": [dict(r) for r in runs]}
    bench_report.summarise(t4)
    assert t4["t4_kernel_ratio_vs_unsloth_tutorial"] == 0.25
    assert t4["unsloth_best_kernel"] == "unsloth-slow" and t4["t4_kernel_ratio_vs_unsloth_best"] == 0.4
    assert [r.get("within_memory_cap") for r in t4["results"]] == [True, False, True, False]


def test_scaling_is_against_the_same_run_on_one_process():
    rep = {"results": [{"name": "speedtune", "backend": "unsloth", "layout": "tokens", "real_tokens_per_s": 1000.0,
                        "peak_alloc_gb": 10.0},
                       {"name": "speedtune-x2", "backend": "unsloth", "layout": "tokens", "processes": 2,
                        "real_tokens_per_s": 1900.0, "peak_alloc_gb": 10.0},
                       {"name": "peft-x2", "backend": "peft", "layout": "rows", "processes": 2,
                        "real_tokens_per_s": 700.0, "peak_alloc_gb": 10.0}]}
    bench_report.summarise(rep)
    assert rep["scaling"] == {"speedtune-x2": {"processes": 2, "vs_one_process": 1.9, "vs_one_process_per_process":
                                               0.95, "against": "speedtune"}}  # peft-x2 has no one-process run
    runs = [{"name": "a"}, {"name": "u", "kind": "unsloth-tuned"}, {"name": "b"}]
    assert [r["name"] for r in with_processes(runs, 2)] == ["a", "a-x2", "u", "b", "b-x2"]  # baselines run as they are


@pytest.mark.slow
def test_longest_sequence_search_smoke(tmp_path, smollm2):
    # one run of the smoke suite (each probe is a fresh process): the search is the same code for every run
    r = cli_here("bench", "--smoke", "--longest", "--max-seq-len", "1024", "--runs", "speedtune", "--results", tmp_path,
                 env={"SPEEDTUNE_BENCH_WORKDIR": str(tmp_path / "work")})
    assert r.returncode == 0, r.stderr
    rep = json.loads(next(tmp_path.glob("*-tiny-longest-fp32.json")).read_text())
    assert rep["longest"] == {"speedtune": 1024}  # nothing runs out of memory on a CPU
    assert [x["longest_seq"] for x in rep["results"]] == [1024]  # the results stay in the report
    assert "seq 512 fits" in r.stdout and "seq 1024 fits" in r.stdout
