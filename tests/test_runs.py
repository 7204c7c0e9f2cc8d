"""speedtune.runs, the one owner of the run folder, and the plan it saves: the plan is frozen, a run writes
run_config.yaml once (before the model loads) and its run-time events at the end, and a run folder as main wrote it
before the format had a number (tests/fixtures/run-format0) still loads."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from speedtune import runs
from speedtune.hardware import Hardware
from speedtune.paths import demo_dir
from speedtune.runs import RunFolder
from speedtune.training import plan as plan_mod
from speedtune.training.config import RunConfig

FORMAT0 = Path(__file__).parent / "fixtures" / "run-format0"
DATA = demo_dir() / "identity.jsonl"
CPU = Hardware("cpu", "a CPU", "float32", "a CPU trains in fp32", None)


def test_the_plan_is_decided_once_and_frozen(smollm2):
    cfg = RunConfig(data=str(DATA), batch_size=2, grad_accum=2, device="cpu")
    kw = dict(output="runs/x", data={"template": "model"}, allocator="expandable_segments:True")
    p = plan_mod.resolve(cfg, CPU, smollm2, [40] * 8, ("peft", "asked"), **kw)
    assert p == plan_mod.resolve(cfg, CPU, smollm2, [40] * 8, ("peft", "asked"), **kw)  # a function of its inputs
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.step_graphs = True
    with pytest.raises(AttributeError):
        p.reasons.append("changed later")
    assert p.output == "runs/x" and p.data == {"template": "model"}
    assert not any(r.startswith("CUDA allocator") for r in p.reasons)  # a CPU run has no CUDA allocator
    assert isinstance(p.as_dict()["reasons"], list)  # saved as a plain YAML list


def test_a_run_writes_its_config_once_and_no_events_when_all_ran_as_planned(tiny_model, tmp_path, monkeypatch):
    from speedtune.training.train import train

    writes = []
    real = runs.write_yaml
    monkeypatch.setattr(runs, "write_yaml", lambda path, data: (writes.append(path.name), real(path, data)))
    out = train(RunConfig(model=str(tiny_model), data=str(DATA), output=str(tmp_path / "run"), max_steps=2,
                          seq_len=128, batch_size=2, grad_accum=1, device="cpu"), show_progress=False)
    assert writes == ["run_config.yaml"]
    run = RunFolder(out)
    assert run.format == runs.FORMAT and run.asked["max_steps"] == 2 and run.plan["backend"] == "peft"
    assert run.template == run.plan["data"]["template"] == "model"
    assert run.events == [] and not run.events_file.exists() and run.plan_as_run() == run.plan
    assert run.metrics()["steps"] == 2 and run.is_run() and run.has_weights()


def test_events_beside_the_plan_give_the_plan_as_it_ran(tmp_path):
    run = RunFolder(tmp_path)
    plan = {"backend": "unsloth", "step_graphs": True, "offload_embeddings": True, "reasons": ["planned"]}
    run.write_config({"data": "x.jsonl"}, plan)
    run.write_events([{"event": "step-graphs-failed", "reason": "recording failed: the passes run eagerly",
                       "changes": {"step_graphs": False}}])
    assert run.plan == plan  # the plan as decided stays as it was saved
    assert run.plan_as_run() == {**plan, "step_graphs": False,
                                 "reasons": ["planned", "recording failed: the passes run eagerly"]}
    run.write_events([])  # a resumed run that ran as planned replaces the earlier segment's events
    assert run.events == [] and run.plan_as_run() == plan


def test_a_run_folder_written_by_main_before_the_format_had_a_number_loads(tmp_path):
    import speedtune as st
    from speedtune.inference.loader import run_base_model
    from speedtune.training.config import load

    old = tmp_path / "old"
    shutil.copytree(FORMAT0, old)
    run = RunFolder(old)
    assert run.format == 0 and run.is_run() and not run.has_weights()
    assert run.asked["max_steps"] == 2 and run.plan["backend"] == "peft" and run.template == "model"
    assert run.plan_as_run() == run.plan  # format 0 saved the plan as it ran
    assert run_base_model(old) == "/tmp/wt31/tiny"  # the model it asked for (its folder is gone)
    assert load(str(run.config_file), {}).max_steps == 2  # `speedtune train --resume` repeats what was asked
    r = st.Run.open(old)
    assert r.metrics["steps"] == 2 and r.plan["micro_batch"] == run.plan["micro_batch"]
    assert json.loads(run.train_log.read_text().splitlines()[0])["event"] == "begin"


def test_export_uses_the_template_the_run_trained_with(tmp_path, tokenizer):
    """The saved plan names it at plan.data.template (an older reader looked for plan.template, never there)."""
    from speedtune.exporting.behaviour import run_template

    old = tmp_path / "old"
    shutil.copytree(FORMAT0, old)
    assert run_template(old, tokenizer).name == "model"  # trained with the model's own template
    saved = yaml.safe_load((old / "run_config.yaml").read_text())
    saved["plan"]["data"]["template"] = "chatml"
    (old / "run_config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert run_template(old, tokenizer).name == "chatml"
