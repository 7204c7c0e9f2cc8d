import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import assert_user_error, cli, cli_here, kill_after_checkpoint

from speedtune.training import backends, config

from speedtune import hardware
from speedtune.errors import UserError
from speedtune.paths import demo_dir

DATA = demo_dir() / "identity.jsonl"


def test_config_precedence_yaml_then_flags(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("lora-r: 8\nlr: 1e-4\nmax_steps: 30\ndata: a.jsonl\n")
    cfg = config.load(str(p), {"max_steps": 5, "lora_r": None})
    assert (cfg.lora_r, cfg.lr, cfg.max_steps, cfg.data) == (8, 1e-4, 5, "a.jsonl")
    assert cfg.lora_alpha == 16 and cfg.seed == 3407  # defaults of the tutorials' recipe
    p.write_text("lora_rank: 8\n")
    with pytest.raises(UserError, match="unknown key 'lora_rank'.*lora_r"):
        config.load(str(p), {})


def test_validation_names_the_flag():
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        config.RunConfig(data="x", output="y", batch_size=0).validate()
    with pytest.raises(UserError, match="--backend: 'fast'"):
        config.RunConfig(data="x", output="y", backend="fast").validate()
    with pytest.raises(UserError, match="--loss-chunk-gb must be positive"):
        config.RunConfig(data="x", output="y", loss_chunk_gb=-1).validate()
    with pytest.raises(UserError, match="--memory-cap-gb must be positive"):
        config.RunConfig(data="x", output="y", memory_cap_gb=0).validate()


def test_backend_choice(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "unsloth" else real(n, *a))
    assert backends.choose("auto", "cuda")[0] == "unsloth"
    assert backends.choose("auto", "cpu") == ("peft", "no CUDA GPU here: Unsloth needs one")
    assert backends.choose("peft", "cuda")[0] == "peft"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        backends.choose("unsloth", "cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "unsloth" else real(n, *a))
    assert backends.choose("auto", "cuda")[0] == "peft"


def test_precision_from_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert hardware.detect("cpu").dtype == "float32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"amx_bf16"})
    assert hardware.detect("cpu").dtype == "bfloat16"

    class FakeCuda:
        is_available = staticmethod(lambda: True)
        get_device_name = staticmethod(lambda i: "Tesla T4")
        is_bf16_supported = staticmethod(lambda: False)

        class _P:
            total_memory = 15 * 2**30

        get_device_properties = staticmethod(lambda i: FakeCuda._P)

    import torch

    monkeypatch.setattr(torch, "cuda", FakeCuda)
    hw = hardware.detect()
    assert (hw.device, hw.dtype) == ("cuda", "float16")


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(tiny_model, tmp_path):
    out = tmp_path / "run"
    r = cli_here("train", "--model", tiny_model, "--data", DATA, "--max-steps", "3", "--output", out,
                 "--eval-split", "0.1", "--eval-steps", "2", "--seq-len", "128", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "generation_config.json",
                 "run_config.yaml", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    from speedtune import hardware

    cpu_dtype = hardware.detect("cpu").dtype  # bf16 on a CPU with AMX, fp32 elsewhere (README: precision)
    assert m["steps"] == 3 and m["backend"] == "peft" and m["dtype"] == cpu_dtype and len(m["loss"]) == 3
    assert m["eval"] and m["versions"]["trl"] and m["peak_rss_gb"] > 0 and m["tokens_per_s"] > 0
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    asked, plan = saved["asked"], saved["plan"]
    assert asked["max_steps"] == 3 and asked["lr"] == 1e-3 and asked["gradient_checkpointing"] is None  # as asked
    assert plan["backend"] == "peft" and plan["device"] == "cpu" and plan["optim"] == "adamw_torch" and plan["reasons"]
    assert plan["data"]["template"] == "model" and plan["data"]["train_rows"] == 50
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log if e["event"] in ("begin", "end")] == ["begin", "end"]
    assert [e["step"] for e in log if e["event"] == "step"] == [1, 2, 3]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
    # an existing output folder is not overwritten
    assert_user_error(cli_here("train", "--model", tiny_model, "--data", DATA, "--output", out),
                      "exists and is not empty", "--overwrite")


def train_args(model, out, max_steps, *extra) -> list[str]:
    """A small `speedtune train` command line on the tiny model and the demo data."""
    return ["train", "--model", str(model), "--data", str(DATA), "--max-steps", str(max_steps), "--output", str(out),
            "--seq-len", "128", *map(str, extra)]


@pytest.mark.slow
def test_resume_after_kill(tiny_model, tmp_path):
    out = tmp_path / "run"
    kill_after_checkpoint(train_args(tiny_model, out, 40, "--save-steps", 2), out)
    assert list((out / "checkpoints").glob("checkpoint-*")), "no checkpoint before the kill"
    assert not (out / "metrics.json").exists()
    (out / "checkpoints" / "checkpoint-39").mkdir()  # as a kill during a save leaves it: no trainer_state.json
    r = cli(*train_args(tiny_model, out, 40, "--save-steps", 2, "--resume"))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 40
    assert m["loss"][0]["step"] > 1  # it continued rather than starting over


@pytest.mark.slow
def test_user_errors(tiny_model, tmp_path):
    assert_user_error(cli_here("train", "--model", "nope-model", "--data", DATA, "--output", tmp_path / "o"),
                      "unknown model 'nope-model'")
    assert_user_error(cli_here("train", "--lora-rank", "8"), "--lora-rank", "speedtune train --help")
    assert_user_error(cli_here("train", "--data", DATA, "--lr", "abc"), "--lr")
    bad = tmp_path / "c.yaml"
    bad.write_text("learning_rate: 1\n")
    assert_user_error(cli_here("train", bad), "unknown key 'learning_rate'")
    bad.write_bytes("lr: 2e-4\nmodel: caf\xe9\n".encode("latin-1"))
    assert_user_error(cli_here("train", bad), "not a UTF-8 text file")
    bad.write_text("lr: fast\n")
    assert_user_error(cli_here("train", bad, "--data", DATA), "lr must be a number")
    assert_user_error(cli_here("train", "--model", tiny_model), "no data: pass --data")
    (tmp_path / "afile").write_text("x")
    assert_user_error(cli_here("train", "--model", tiny_model, "--data", DATA, "--output", tmp_path / "afile" / "run"),
                      "can't write there")
    assert_user_error(cli_here("train", "--model", tiny_model, "--data", DATA, "--output", tmp_path / "o2", "--4bit"),
                      "--4bit needs a CUDA GPU")
    assert_user_error(cli_here("train", "--model", tiny_model, "--data", DATA, "--output", tmp_path / "o3",
                               "--cuda-graphs"), "--cuda-graphs needs the Unsloth backend on a CUDA GPU")
    assert not (tmp_path / "o3").exists()  # refused before anything was written


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "speedtune", *train_args(tiny_model, out, 100000, "--save-steps", 100000)]
    # started with SIGINT ignored, as a script's background job (`speedtune train ... &`) or anything it starts is
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and '"event": "step"' in log.read_text()):
        time.sleep(0.2)  # training has taken a step
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:  # a run that ignored the interrupt would train on (100,000 steps) after the test
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    [ckpt] = (out / "checkpoints").glob("checkpoint-*")
    step = int(ckpt.name.split("-")[1])
    assert step > 0
    r = cli(*train_args(tiny_model, out, step + 2, "--resume"))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == step + 2


def test_without_output_a_new_run_folder_is_made_and_named(tiny_model, tmp_path):
    r = cli_here("train", "--model", tiny_model, "--data", DATA, "--max-steps", "1", "--seq-len", "128", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [run] = (tmp_path / "runs").iterdir()
    assert run.name.startswith(tiny_model.name + "-") and (run / "adapter_model.safetensors").is_file()
    assert f"run folder runs/{run.name}" in " ".join(r.stderr.split())


def train_here(model, out, max_steps, **extra) -> dict:
    """A small run on the tiny model and the demo data in this process (speedtune train's own function, without a
    process start for each run); returns its metrics.json."""
    from speedtune.training.config import RunConfig
    from speedtune.training.train import train

    train(RunConfig(model=str(model), data=str(DATA), output=str(out), max_steps=max_steps, seq_len=128, **extra),
          show_progress=False)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_token_layout_trains_the_same_step_as_accumulation(tiny_model, tmp_path):
    """The same rows in one sorted pass without a padding mask, in one padding-free sequence (both with the output
    layer at the trained positions only), or in micro-batches of 2 with the mask: the same steps, to float rounding (fp32 asked, so the plan cannot pick bf16 on an AMX CPU).
    Measured here: losses within 2e-7 relative over 4 steps. The step-1 gradient norm is compared too: the loss there
    is the same whatever LoRA's B matrices (they start at zero), the gradient is not; it caught an unseeded LoRA init
    (CI: 1.1e-4 apart at step 4), and it would catch a packed row attending to the row before it."""
    runs = {}
    for name, extra in (("padded", {"fit": "auto", "padding_free": False}), ("packed", {"fit": "auto",
                        "padding_free": True}), ("off", {"fit": "off"})):
        runs[name] = train_here(tiny_model, tmp_path / name, 4, batch_size=2, grad_accum=3, lr=1e-3, precision="fp32",
                                **extra)
    off = runs["off"]
    plans = {n: yaml.safe_load((tmp_path / n / "run_config.yaml").read_text())["plan"] for n in runs}
    assert plans["padded"]["label_logits"] and plans["packed"]["label_logits"] and not plans["off"]["label_logits"]
    assert runs["packed"]["padded_tokens"] == runs["packed"]["real_tokens"] < runs["padded"]["padded_tokens"]
    for name in ("padded", "packed"):
        laid = runs[name]
        assert laid["passes"] < off["passes"] == 4 * 3
        first_a, first_o = laid["loss"][0], off["loss"][0]
        assert first_a["grad_norm"] > 0
        for key in ("loss", "grad_norm"):
            assert first_a[key] == pytest.approx(first_o[key], rel=1e-5), (name, key, first_a, first_o)
        for a, b in zip(laid["loss"], off["loss"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (name, a, b)
        assert laid["real_tokens"] == off["real_tokens"]


@pytest.mark.slow
def test_the_same_seed_trains_the_same_adapter(tiny_model, tmp_path):
    """The recipe's seed fixes LoRA's random init too (not only the data order): two runs give one adapter."""
    from safetensors.torch import load_file

    adapters = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):  # in one process: a seed that left some random state alone fails
        train_here(tiny_model, tmp_path / name, 1, seed=seed, lr=1e-3, precision="fp32")
        adapters[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    assert adapters["a"].keys() == adapters["b"].keys() == adapters["c"].keys()
    assert all((adapters["a"][k] == adapters["b"][k]).all() for k in adapters["a"])
    assert any(not (adapters["a"][k] == adapters["c"][k]).all() for k in adapters["a"])


def test_rows_padded_to_a_multiple_train_the_same_steps(tiny_model, tmp_path, monkeypatch):
    """CUDA graphs pad each micro-batch to a multiple of a few widths (plan.pad_multiple). The extra padding sits
    after every real token, under the causal mask and without labels, so the steps are the same to float rounding;
    the padded tokens are counted. Run in this process with the plan's multiple forced (a CPU has no graphs)."""
    from speedtune.training import plan as plan_mod
    from speedtune.training.config import RunConfig
    from speedtune.training.train import train

    real = plan_mod.resolve
    runs = {}
    for multiple in (None, 64):
        def resolve(*a, _m=multiple, **kw):
            return dataclasses.replace(real(*a, **kw), pad_multiple=_m)

        monkeypatch.setattr(plan_mod, "resolve", resolve)
        out = train(RunConfig(model=str(tiny_model), data=str(DATA), output=str(tmp_path / str(multiple)),
                              max_steps=3, seq_len=128, batch_size=2, grad_accum=2, lr=1e-3, precision="fp32"),
                    show_progress=False)
        runs[multiple] = json.loads((out / "metrics.json").read_text())
    plain, padded = runs[None], runs[64]
    assert padded["padded_tokens"] > plain["padded_tokens"] and padded["real_tokens"] == plain["real_tokens"]
    assert padded["padded_tokens"] % 64 == 0
    for a, b in zip(plain["loss"], padded["loss"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_label_loss_is_the_full_forwards_loss(tiny_model):
    """The output layer applied at the trained positions only (trainer.label_loss, plan.label_logits) gives the loss
    and the LoRA gradients of the model's own forward, on a padded batch with prompt tokens (no label) in it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from speedtune.training.trainer import IGNORE, label_loss

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 500, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # the prompt
    labels[2, 9:] = IGNORE  # a shorter row, padded on the right
    micro = {"input_ids": ids, "labels": labels}
    n = int((labels[:, 1:] != IGNORE).sum())
    results = []
    for loss_of in (lambda: model(**micro, num_items_in_batch=n).loss, lambda: label_loss(model, micro, n)):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (full, g_full), (mine, g_mine) = results
    assert mine == pytest.approx(full, rel=1e-6) and full > 0
    # float32 rounding differs with the order of the sums (the kernels of the CPU at hand): within 1e-5 of each tensor's
    # largest gradient (measured: 3e-7 at most, for gradients up to 0.38)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))  # noqa: E731
    assert all(close(a, b) for a, b in zip(g_full, g_mine)) and len(g_full) > 4
    labels[:, 6:] = IGNORE  # fewer trained positions: a different loss, so the comparison above can fail
    assert label_loss(model, micro, n).item() != pytest.approx(full, rel=1e-3)
