import json

import pytest
from conftest import assert_user_error, cli

from speedtune import bench_report
from speedtune.bench import LOSS_TOLERANCE, check_losses


def test_bench_smoke_runs_trains_code_path_on_real_length_rows(tmp_path, smollm2):
    """The CPU smoke mode proves the harness (a fresh process per run through speedtune train, the same rows in
    the same order, report files, the loss check), not the numbers."""
    r = cli("bench", "--smoke", "--results", tmp_path / "res", env={"SPEEDTUNE_BENCH_WORKDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    [report] = (tmp_path / "res").glob("*-tiny-alpaca-seq256-fp32.json")
    rep = json.loads(report.read_text())
    assert rep["device"] and rep["fairness"] and rep["data"] == "alpaca"
    by = {x["name"]: x for x in rep["results"]}
    assert set(by) == {"peft", "speedtune"}
    peft, fast = by["peft"], by["speedtune"]
    assert peft["layout"] == "rows" and peft["gradient_checkpointing"] is True and peft["passes_per_step"] == 2
    assert fast["layout"] == "tokens" and fast["passes_per_step"] <= 2
    assert fast["label_logits"] and not peft["label_logits"]  # the baseline keeps the model's own forward and loss
    for x in (peft, fast):
        assert x["real_tokens_per_s"] > 0 and x["s_per_step"] > 0 and x["time_to_adapter_s"] > x["load_s"]
        assert len(x["losses"]) == 4 and x["rows"] == 64
    assert fast["max_rel_loss_diff"] < 1e-4  # the same math on the CPU in fp32
    assert rep["speedtune_vs_peft"] == fast["real_tokens_per_s"] / peft["real_tokens_per_s"]
    assert report.with_suffix(".md").read_text().startswith("# tiny")
    assert report.with_suffix(".png").stat().st_size > 1000
    # the same suite again, one run only, reusing the other's result
    r = cli("bench", "--smoke", "--runs", "speedtune", "--resume", "--results", tmp_path / "res2",
            env={"SPEEDTUNE_BENCH_WORKDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "peft: reusing its result" in " ".join((r.stdout + r.stderr).split())


def test_loss_check_catches_a_run_that_trains_something_else():
    ok = {"name": "a", "losses": [10.0, 9.0, 8.0]}
    same = {"name": "b", "losses": [10.001, 9.002, 7.999]}
    other = {"name": "c", "losses": [10.0, 9.5, 8.8]}
    failures = check_losses([ok, same, other], "a")
    assert len(failures) == 1 and failures[0].startswith("c step 3")
    assert same["max_rel_loss_diff"] < LOSS_TOLERANCE < other["max_rel_loss_diff"]


def test_ratios_come_from_the_runs():
    rep = {"results": [{"name": "peft", "real_tokens_per_s": 100.0, "peak_alloc_gb": 10.0},
                       {"name": "unsloth", "real_tokens_per_s": 250.0, "peak_alloc_gb": 6.0},
                       {"name": "speedtune", "real_tokens_per_s": 400.0, "peak_alloc_gb": 12.0},
                       {"name": "speedtune-12gb", "real_tokens_per_s": 300.0, "peak_alloc_gb": 7.5}]}
    bench_report.summarise(rep)
    assert rep["speedtune_12gb_vs_unsloth"] == 1.2 and rep["speedtune_12gb_memory_vs_peft"] == 0.75
    assert rep["speedtune_vs_unsloth"] == 1.6 and rep["speedtune_vs_peft"] == 4.0 and rep["unsloth_vs_peft"] == 2.5
    assert rep["speedtune_memory_vs_peft"] == 1.2 and rep["results"][1]["memory_vs_peft"] == 0.6


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
    from speedtune.bench import with_processes

    assert [r["name"] for r in with_processes([{"name": "a"}, {"name": "b"}], 2)] == ["a", "a-x2", "b", "b-x2"]


def test_bench_bad_suite(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("shape: llama-9\n")
    assert_user_error(cli("bench", bad), "unknown shape 'llama-9'")
    bad.write_text("seqlen: 5\n")
    assert_user_error(cli("bench", bad), "unknown key(s) seqlen")
    bad.write_text("shape: [unclosed\n")
    assert_user_error(cli("bench", bad), "not valid YAML")
    assert_user_error(cli("bench", "--smoke", "--runs", "fastest"), "no run named fastest")
    assert_user_error(cli("bench", "--smoke", "--lengths", tmp_path / "none.txt"), "length profile not found")


@pytest.mark.slow
def test_longest_sequence_search_smoke(tmp_path, smollm2):
    r = cli("bench", "--smoke", "--longest", "--max-seq-len", "1024", "--results", tmp_path,
            env={"SPEEDTUNE_BENCH_WORKDIR": str(tmp_path / "work")})
    assert r.returncode == 0, r.stderr
    rep = json.loads(next(tmp_path.glob("*-tiny-longest-fp32.json")).read_text())
    assert rep["longest"] == {"peft": 1024, "speedtune": 1024}  # nothing runs out of memory on the CPU
    assert [x["longest_seq"] for x in rep["results"]] == [1024, 1024]  # the results stay in the report
    assert "seq 512 fits" in r.stdout and "seq 1024 fits" in r.stdout
