import json

from conftest import assert_user_error, cli


def test_bench_smoke_writes_a_report(tmp_path, smollm2):
    """The CPU smoke mode proves the harness (fresh process per backend, report files), not the numbers."""
    r = cli("bench", "--smoke", "--results", tmp_path)
    assert r.returncode == 0, r.stderr
    reports = list(tmp_path.glob("*-tiny-seq128.json"))
    assert len(reports) == 1
    rep = json.loads(reports[0].read_text())
    assert rep["device"] and rep["fairness"]
    [peft] = rep["results"]  # no GPU here: the Unsloth runs are skipped, and said so
    assert peft["backend"] == "peft" and peft["tokens_per_s"] > 0 and peft["peak_alloc_gb"] > 0
    assert peft["tokens_per_step"] == 2 * 1 * 128 and len(peft["losses"]) == 3
    assert "skipping unsloth" in r.stdout + r.stderr
    assert reports[0].with_suffix(".md").read_text().startswith("# tiny")
    assert reports[0].with_suffix(".png").stat().st_size > 1000


def test_committed_gpu_results_have_the_promised_fields():
    """The latest committed seed-recipe report holds the three-way comparison and the memory profile, its ratios
    agree with its own runs, and every run's losses match the reference run's (same math)."""
    from pathlib import Path

    results = sorted(Path(__file__).parent.parent.joinpath("benchmarks", "results").glob("*llama-3-8b-seq2048.json"))
    assert results, "the GPU results are committed"
    rep = json.loads(results[-1].read_text())
    by = {r["name"]: r for r in rep["results"]}
    assert set(by) >= {"peft", "unsloth", "speedtune", "speedtune-memory"}
    assert rep["speedup"] == by["unsloth"]["tokens_per_s"] / by["peft"]["tokens_per_s"]
    assert rep["auto_speedup"] == by["speedtune"]["tokens_per_s"] / by["peft"]["tokens_per_s"]
    assert rep["memory_profile_ratio"] == by["speedtune-memory"]["peak_alloc_gb"] / by["peft"]["peak_alloc_gb"]
    assert by["speedtune"]["fit"]["mode"] == "speed" and by["speedtune-memory"]["fit"]["mode"] == "memory"
    for r in rep["results"]:
        assert r["name"] == "unsloth" or r["max_loss_diff_vs_unsloth"] < 0.01


def test_bench_bad_suite(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("shape: llama-9\n")
    assert_user_error(cli("bench", bad), "unknown shape 'llama-9'")
    bad.write_text("seqlen: 5\n")
    assert_user_error(cli("bench", bad), "unknown key(s) seqlen")


def test_longest_sequence_search_smoke(tmp_path, smollm2):
    r = cli("bench", "--smoke", "--longest", "--max-seq-len", "1024", "--results", tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(next(tmp_path.glob("*-tiny-longest.json")).read_text())
    assert rep["longest"] == {"peft": 1024}  # nothing runs out of memory on the CPU: the search's upper bound
    assert "seq 512 fits" in r.stdout and "seq 1024 fits" in r.stdout
