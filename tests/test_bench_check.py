"""The bench's loss check (speedtune.benchmarking.check) can fail: on real weights and real text a wrong layout (packed rows
that attend across the row boundary, a dropped row) is caught while the right one passes; a missing or failed
reference fails it; the tolerance comes from measured noise where the suite measures it; the eval check holds every
run's final eval loss to the reference's seed spread."""

import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from speedtune.benchmarking.check import DEFAULT, FLOOR, NOISE_SAFETY, check_eval, check_losses

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "dpo-en-demo-chosen-train.jsonl"


def result(name, losses, norms=None, **kw):
    return {"name": name, "losses": losses, "grad_norms": norms or [1.0] * len(losses), "seed": 3407,
            "dtype": "bfloat16", **kw}


def test_a_run_that_trains_something_else_fails_within_the_constant_tolerance():
    ok = result("a", [10.0, 9.0, 8.0])
    same = result("b", [10.001, 9.002, 7.999], [1.001, 0.99, 1.0])
    other = result("c", [10.0, 9.5, 8.8])
    norm = result("d", [10.0, 9.0, 8.0], [1.0, 1.2, 1.0])
    failures, summary = check_losses([ok, same, other, norm], "a")
    assert [f.split(":")[0] for f in failures] == ["c step 3", "d step 2"], failures
    assert "gradient norm 1.2000 vs a's 1.0000" in failures[1]
    assert same["max_rel_loss_diff"] < DEFAULT["bfloat16"][0] < other["max_rel_loss_diff"]
    assert same["loss_check"] == "pass" and other["loss_check"] == "fail"
    assert summary["tolerance_from"].startswith("constants")


def test_the_reference_missing_or_failed_fails_the_check():
    runs = [result("b", [1.0, 1.0])]
    [f] = check_losses(runs, "a")[0]
    assert f.startswith("the reference run a did not run")
    [f] = check_losses([{"name": "a", "failed": True, "error": "ValueError: boom"}, *runs], "a")[0]
    assert "the reference run a failed (ValueError: boom)" in f
    [f] = check_losses([{"name": "a", "oom": True}, *runs], "a")[0]
    assert "ran out of memory" in f


def test_the_tolerance_comes_from_the_noise_runs():
    """A same-seed repeat of the reference in another layout measures the numerics' noise per step; a run far
    inside the constant tolerance still fails when it is well outside that noise."""
    ref = result("ref", [2.0, 1.9, 1.8, 1.7])
    noise = result("ref-1x8", [2.0, 1.9001, 1.8002, 1.7001], repeat_of="ref")  # 1e-4 relative: numerics
    close = result("ok", [2.0, 1.9002, 1.8001, 1.7003])
    drift = result("bad", [2.0, 1.9, 1.8125, 1.7])  # 0.7%: inside bf16's constant 1%, outside the noise's floor
    other_seed = result("ref-seed2", [2.3, 2.1, 1.7, 1.6], seed=2, repeat_of="ref")
    failures, summary = check_losses([ref, noise, close, drift, other_seed], "ref")
    assert summary["tolerance_from"] == f"noise runs ref-1x8 x {NOISE_SAFETY:g}"
    assert [f.split(":")[0] for f in failures] == ["bad step 3"], failures
    assert close["loss_tolerance"] == FLOOR["bfloat16"][0] > NOISE_SAFETY * 1e-4 and "loss_check" not in other_seed
    assert drift["max_rel_loss_diff"] < DEFAULT["bfloat16"][0]
    # noisier numerics measured (0.3% at step 2): the same drift is within 3x that from step 2 on
    loud = result("ref-1x8", [2.0, 1.9057, 1.8, 1.7], repeat_of="ref")
    drift = result("bad", [2.0, 1.9, 1.8125, 1.7])
    assert check_losses([ref, loud, drift], "ref")[0] == []
    assert drift["loss_tolerance"] == pytest.approx(NOISE_SAFETY * 0.0057 / 1.9, rel=1e-6)


def test_a_run_with_another_seed_is_not_compared_step_by_step():
    ref, other = result("ref", [2.0, 1.5]), result("x", [2.4, 1.1], seed=9)
    assert check_losses([ref, other], "ref")[0] == [] and other["loss_check"].startswith("not compared")


def test_final_eval_losses_must_lie_within_the_seed_spread():
    runs = [result("ref", [1.0], final_eval_loss=1.50), result("ref-s2", [1.0], seed=2, repeat_of="ref",
                                                                 final_eval_loss=1.52),
            result("ref-s3", [1.0], seed=3, repeat_of="ref", final_eval_loss=1.49),
            result("packed", [1.0], final_eval_loss=1.505), result("broken", [1.0], final_eval_loss=1.56)]
    failures, spread = check_eval(runs, "ref")
    assert spread["spread"] == pytest.approx(0.03) and spread["mean"] == pytest.approx(1.5033, abs=1e-4)
    assert len(failures) == 1 and failures[0].startswith("broken: final eval loss 1.5600")
    assert runs[3]["eval_within_seed_spread"] and not runs[4]["eval_within_seed_spread"]
    _, one = check_eval(runs[:1] + runs[3:], "ref")
    assert one["note"].startswith("one seed")


@pytest.mark.slow
def test_wrong_layouts_fail_on_real_weights_and_the_right_one_passes(smollm2, tmp_path, monkeypatch):
    """The real SmolLM2-135M on the shortest real rows, fp32, 2 steps of 4 rows, through the bench worker in this
    process (so the layout can be broken for the test only): the reference (the recipe's padded micro-batches, the
    model's own loss), the packed layout, and the packed layout broken two ways: positions that run on across the
    rows (each row attends to the rows packed before it) and a row left out of its pass."""
    import torch

    from speedtune.benchmarking import rows as bench_data, worker as bench_worker

    from speedtune.training import layout, trainer
    from speedtune.benchmarking.suite import Suite
    from speedtune.data.dataset import DataOptions, build
    from transformers import AutoTokenizer

    rows = [json.loads(x) for x in DATA.read_text().splitlines()]
    built = build(DataOptions(str(DATA)), AutoTokenizer.from_pretrained(smollm2), 100000)
    short = [r for r, e in sorted(zip(rows, built.examples), key=lambda x: len(x[1].input_ids))][:8]  # 76-97 tokens
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in short))
    suite = Suite(model="smollm2-135m", data=str(data), seq_len=256, batch_size=2, grad_accum=2, steps=2,
                  warmup_steps=0, load_in_4bit=False, device="cpu", precision="fp32", workdir=str(tmp_path), runs=[])
    prepared = bench_data.prepare(suite, smollm2, tmp_path)
    pack, by_tokens = trainer.pack, layout.by_tokens

    def across(*args, **kw):
        micro = pack(*args, **kw)
        micro["position_ids"] = torch.arange(micro["input_ids"].shape[1])[None]  # one sequence: no row boundary
        return micro

    def dropping(*args, **kw):
        groups = by_tokens(*args, **kw)
        return [g[:-1] if len(g) > 1 and i == 0 else g for i, g in enumerate(groups)]

    results = []
    for name, run, patch in (("ref", {"fit": "off"}, None), ("packed", {"padding_free": True}, None),
                             ("across", {"padding_free": True}, ("pack", across)),
                             ("dropped", {"padding_free": True}, ("by_tokens", dropping))):
        monkeypatch.setattr(trainer, "pack", pack)
        monkeypatch.setattr(layout, "by_tokens", by_tokens)
        if patch:
            monkeypatch.setattr(trainer if patch[0] == "pack" else layout, patch[0], patch[1])
        spec = {"suite": asdict(suite), "run": {"name": name, "backend": "peft", "fit": "auto", **run},
                "model_path": str(smollm2), "data_path": str(prepared.train), "examples_path": str(prepared.examples),
                "eval_examples": None, "rows": prepared.rows, "output": str(tmp_path / name), "cuda": False,
                "profile_steps": 0, "spawned_at": time.time()}
        results.append(bench_worker.measure(spec))
    by = {r["name"]: r for r in results}
    assert by["packed"]["padding_free"] and by["packed"]["passes_per_step"] < by["ref"]["passes_per_step"]
    failures, _ = check_losses(results, "ref")
    failed = {f.split(" step ")[0] for f in failures}
    assert failed == {"across", "dropped"}, failures
    assert by["packed"]["loss_check"] == "pass" and by["packed"]["max_rel_loss_diff"] < 1e-5
    for name in ("across", "dropped"):  # both caught at the first step already (LoRA's B is still zero there)
        first = abs(by[name]["losses"][0] - by["ref"]["losses"][0]) / by["ref"]["losses"][0]
        assert first > DEFAULT["float32"][0], (name, first)
