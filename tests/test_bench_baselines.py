"""The baselines run by their own libraries (speedtune.benchmarking.baselines): what the suite's run specs turn into, as
Unsloth's tutorial code and TRL's SFTTrainer would be given them. Pure functions: no Unsloth needed (it needs a GPU);
the `trl` kind, the same worker without Unsloth, runs for real in tests/test_bench.py's smoke suite."""

import pytest

from speedtune.benchmarking.baselines import lora_arguments, recipe, trainer_arguments
from speedtune.benchmarking.suite import Suite
from speedtune.errors import UserError

SUITE = {"batch_size": 2, "grad_accum": 4, "steps": 60, "seq_len": 2048, "lora_r": 16, "lora_alpha": 16,
         "precision": "auto", "seed": 3407, "optim": None, "load_in_4bit": True}


def test_the_tutorial_run_is_the_tutorial_code_as_copied():
    r = recipe("unsloth-tutorial", SUITE, {"name": "t", "kind": "unsloth-tutorial"}, cuda=True)
    assert (r["batch_size"], r["grad_accum"], r["gradient_checkpointing"], r["padding_free"]) == (2, 4, "unsloth", None)
    args = trainer_arguments(r, SUITE, "/tmp/o", cuda=True, bf16_ok=True)
    assert args["per_device_train_batch_size"] == 2 and args["gradient_accumulation_steps"] == 4
    assert (args["optim"], args["learning_rate"], args["warmup_steps"], args["lr_scheduler_type"]) == \
        ("adamw_8bit", 2e-4, 5, "linear")
    assert args["weight_decay"] == 0.01 and args["seed"] == 3407 and args["max_steps"] == 60
    assert args["logging_steps"] == 1
    assert args["bf16"] and not args["fp16"] and not args["use_cpu"] and args["max_length"] == 2048
    assert "padding_free" not in args  # left unset: Unsloth picks its own default
    assert "gradient_checkpointing" not in args  # Unsloth's get_peft_model sets it ("unsloth": offloaded)
    assert lora_arguments(r, SUITE) == {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
                                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]}
    # a GPU without bf16 (a T4): fp16, as the tutorial's `fp16 = not is_bfloat16_supported()`
    t4 = trainer_arguments(r, SUITE, "/tmp/o", cuda=True, bf16_ok=False)
    assert t4["fp16"] and not t4["bf16"]
    # the T4 proxy asks for fp16 on a GPU that has bf16
    fp16 = recipe("unsloth-tutorial", {**SUITE, "precision": "fp16"}, {"name": "t"}, cuda=True)
    assert trainer_arguments(fp16, SUITE, "/tmp/o", cuda=True, bf16_ok=True)["fp16"]


def test_the_default_suite_runs_unsloth_by_its_own_trainer():
    runs = {r["name"]: r for r in Suite().runs}
    assert runs["unsloth-tutorial"]["kind"] == "unsloth-tutorial" and Suite().reference == "peft"


def test_the_tuned_run_takes_the_suite_settings():
    run = {"name": "u", "kind": "unsloth-tuned", "batch_size": 8, "grad_accum": 1, "gradient_checkpointing": False,
           "padding_free": True, "seed": 7}
    r = recipe("unsloth-tuned", SUITE, run, cuda=True)
    args = trainer_arguments(r, SUITE, "/tmp/o", cuda=True, bf16_ok=True)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (8, 1)
    assert args["padding_free"] is True and args["seed"] == 7 and r["gradient_checkpointing"] is False
    assert args["optim"] == "adamw_8bit"  # the tutorial's, unless the run or the suite says otherwise
    tuned = recipe("unsloth-tuned", {**SUITE, "optim": "adamw_torch"}, {"name": "u"}, cuda=True)
    assert tuned["optim"] == "adamw_torch"


def test_trl_on_a_cpu_is_fp32_and_sets_checkpointing_itself():
    r = recipe("trl", SUITE, {"name": "trl", "kind": "trl"}, cuda=False)
    args = trainer_arguments(r, SUITE, "/tmp/o", cuda=False, bf16_ok=False)
    assert args["use_cpu"] and not args["bf16"] and not args["fp16"] and args["optim"] == "adamw_torch"
    assert args["gradient_checkpointing"] is False  # TRL's config default would turn it on


@pytest.mark.parametrize("kind, run, needle", [
    ("unsloth-tutorial", {"batch_size": 8}, "can't set batch_size"),
    ("unsloth-tuned", {"batch_size": 4, "grad_accum": 1}, "4 x 1 rows a step, the suite's recipe is 8"),
    ("unsloth-tuned", {"gradient_checkpointing": "yes"}, "gradient_checkpointing must be"),
    ("trl", {"gradient_checkpointing": "unsloth"}, "gradient_checkpointing must be true, false (got"),
    ("unsloth-tuned", {"lr": 1e-3}, "can't set lr"),
])
def test_a_baseline_setting_that_cannot_hold_is_refused(kind, run, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        recipe(kind, SUITE, {"name": "x", "kind": kind, **run}, cuda=True)
