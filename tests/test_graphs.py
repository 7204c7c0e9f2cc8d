"""Whole passes as CUDA graphs (speedtune.graphs): the pass is the model's own loss and gradients, the buffers and the
hand-over to the optimizer give the step accumulation computes, and training with them (the same pass outside a
graph on a CPU) takes the same steps as without. The recording itself needs a CUDA GPU: the last test runs there
(the device runs of benchmarks/results/), and is skipped on a CPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_user_error, cli
from test_train import DATA, train_args


def lora_model(path, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def batch(n_rows=3, width=12, prompt=5, short_row=(2, 9), device="cpu"):
    from speedtune.graphs import IGNORE

    ids = torch.randint(3, 500, (n_rows, width))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    row, end = short_row
    labels[row, end:] = IGNORE  # a shorter row, padded on the right
    ids[row, end:] = 2
    mask = (torch.arange(width)[None] < torch.tensor([end if r == row else width for r in range(n_rows)])[:, None])
    return ids.to(device), labels.to(device), mask.long().to(device)


def own_loss_and_grads(model, ids, labels, mask, n):
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels, attention_mask=mask, num_items_in_batch=n).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_the_pass_is_the_models_own_loss_and_gradients(tiny_model):
    """No padding mask (right padding under the causal mask), the label count as a tensor, the output layer at every
    position: the masked forward's loss and LoRA gradients, to float rounding."""
    from speedtune.graphs import IGNORE, pass_loss

    model = lora_model(tiny_model)
    ids, labels, mask = batch()
    n = int((labels[:, 1:] != IGNORE).sum())
    full, g_full = own_loss_and_grads(model, ids, labels, mask, n)
    model.zero_grad()
    loss = pass_loss(model, ids, labels, torch.tensor(float(n)))
    loss.backward()
    g_mine = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert loss.item() == pytest.approx(full, rel=1e-6) and full > 0
    # the chunked output layer sums in another order: fp32 rounding (~1e-7 on gradients up to ~0.3)
    assert len(g_full) > 4 and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_full, g_mine))
    labels[:, 8:] = IGNORE  # fewer trained positions: another loss, so the comparison can fail
    assert pass_loss(model, ids, labels, torch.tensor(float(n))).item() != pytest.approx(full, rel=1e-3)


def test_the_buffers_accumulate_a_step_and_start_the_next_at_zero(tiny_model):
    """Two passes of one step add into the gradient buffers (normalised over the step's labels), the parameters get
    them as .grad; the next step starts again from zero rather than adding to the last."""
    from speedtune.graphs import IGNORE, PassGraphs

    model = lora_model(tiny_model)
    a, b = batch(2, 10, 4, (1, 7)), batch(3, 12, 5, (0, 9))
    n = sum(int((x[1][:, 1:] != IGNORE).sum()) for x in (a, b))
    model.zero_grad()
    expected = 0.0
    for ids, labels, mask in (a, b):
        loss = model(input_ids=ids, labels=labels, attention_mask=mask, num_items_in_batch=n).loss
        loss.backward()
        expected += loss.item()
    want = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)

    graphs = PassGraphs(model, None, record=False)
    for _ in range(2):  # two identical steps: the second must not add to the first
        graphs.begin_step(n)
        total = sum(graphs.run(ids, labels).item() for ids, labels, _ in (a, b))
        graphs.end_step()
        got = [p.grad for p in model.parameters() if p.requires_grad]
        assert total == pytest.approx(expected, rel=1e-6)
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(want, got))
        model.zero_grad(set_to_none=True)  # what the Trainer does after the optimizer step
    assert graphs.eager_passes == 4 and graphs.replays == 0 and not graphs.graphs


def test_training_through_the_pass_buffers_takes_the_same_steps(tiny_model, tmp_path, monkeypatch):
    """The trainer with plan.step_graphs (forced: a CPU records no graphs, so the same pass runs eagerly through the
    same buffers) against the plain trainer: the same losses and gradient norms; the run says how its passes ran."""
    import yaml

    from speedtune import plan as plan_mod
    from speedtune.config import RunConfig
    from speedtune.train import train

    real = plan_mod.resolve
    runs = {}
    for on, ck in ((False, False), (True, False), (True, True)):
        def resolve(*a, _on=on, **kw):
            p = real(*a, **kw)
            p.step_graphs, p.pad_multiple, p.label_logits = _on, 64 if _on else None, False
            return p

        monkeypatch.setattr(plan_mod, "resolve", resolve)
        out = train(RunConfig(model=str(tiny_model), data=str(DATA), output=str(tmp_path / f"{on}-{ck}"), max_steps=3,
                              seq_len=128, batch_size=2, grad_accum=2, lr=1e-3, precision="fp32", fit="off",
                              device="cpu", backend="peft", gradient_checkpointing=ck),
                    show_progress=False)
        runs[on, ck] = json.loads((out / "metrics.json").read_text())
    plain = runs[False, False]
    assert plain["step_graphs"] is None
    for ck in (False, True):  # checkpointing recomputes inside the same pass: the same steps again
        graphed = runs[True, ck]
        assert graphed["step_graphs"] == {"shapes": [], "replays": 0, "eager_passes": 3 * 2, "failed": None}
        assert yaml.safe_load((tmp_path / f"True-{ck}" / "run_config.yaml").read_text())["plan"]["step_graphs"]
        for a, b in zip(plain["loss"], graphed["loss"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert graphed["loss"][0]["grad_norm"] > 0


def test_step_graphs_asked_where_they_cant_run_is_a_one_line_error(tiny_model, tmp_path):
    r = cli(*train_args(tiny_model, tmp_path / "cpu", 1, "--step-graphs", "--device", "cpu"))
    assert_user_error(r, "--step-graphs needs a CUDA GPU")
    assert not (tmp_path / "cpu").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs a CUDA GPU")
def test_a_recorded_pass_replays_the_eager_pass(tiny_model):
    """On a GPU: a recorded pass, replayed on new rows of the same shape, gives the eager pass's loss and gradients;
    a second shape is recorded into the same pool."""
    from speedtune.graphs import IGNORE, PassGraphs

    model = lora_model(tiny_model).cuda()
    graphs = PassGraphs(model, None)
    for width in (12, 12, 16, 12):
        ids, labels, mask = batch(3, width, 5, (2, 9), device="cuda")
        n = int((labels[:, 1:] != IGNORE).sum())
        full, g_full = own_loss_and_grads(model, ids, labels, mask, n)
        model.zero_grad(set_to_none=True)
        graphs.begin_step(n)
        loss = graphs.run(ids, labels).item()
        graphs.end_step()
        assert graphs.failed is None
        assert loss == pytest.approx(full, rel=1e-5)
        assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)
                   for a, p in zip(g_full, [p for p in model.parameters() if p.requires_grad]))
    assert sorted(graphs.graphs) == [(3, 12), (3, 16)] and graphs.replays == 4 and graphs.eager_passes == 0


def test_step_graphs_default_and_conflicts():
    """On by default on a GPU with the fit on, in one process, without fp16, either backend, checkpointing or not;
    asked for where it can't run, the error names what is missing."""
    from types import SimpleNamespace as NS

    from speedtune.errors import UserError
    from speedtune.plan import resolve_step_graphs

    gpu, cpu, t4 = NS(device="cuda", dtype="bfloat16"), NS(device="cpu", dtype="float32"), NS(device="cuda", dtype="float16")
    cfg = lambda asked=None, fit="auto": NS(step_graphs=asked, fit=fit)  # noqa: E731
    assert resolve_step_graphs(cfg(), gpu, 1, False, False)
    assert not resolve_step_graphs(cfg(fit="off"), gpu, 1, False, False)  # the baselines stay vanilla
    assert not resolve_step_graphs(cfg(fit="lean"), gpu, 1, False, False)
    assert not resolve_step_graphs(cfg(), cpu, 1, False, False)
    assert not resolve_step_graphs(cfg(), t4, 1, False, False)
    assert not resolve_step_graphs(cfg(False), gpu, 1, False, False)
    assert not resolve_step_graphs(cfg(), gpu, 1, False, True)  # padding-free asked: it wins over the default
    assert resolve_step_graphs(cfg(True, fit="off"), gpu, 1, False, False)
    for hw, world, block, packed, needle in ((t4, 1, False, False, "bf16 or fp32"),
                                             (cpu, 1, False, False, "a CUDA GPU"),
                                             (gpu, 2, False, False, "one process"),
                                             (gpu, 1, True, False, "no --cuda-graphs"),
                                             (gpu, 1, False, True, "padded rows")):
        with pytest.raises(UserError, match=needle):
            resolve_step_graphs(cfg(True), hw, world, block, packed)


def test_unsloth_checkpoints_plainly_under_pass_graphs():
    """Unsloth's offloaded checkpointing copies layer inputs to CPU memory, which a graph can't hold: under pass
    graphs its plain recomputation runs instead."""
    from types import SimpleNamespace as NS

    from speedtune.backends.unsloth_backend import checkpointing

    assert checkpointing(NS(gradient_checkpointing=True, step_graphs=False)) == "unsloth"
    assert checkpointing(NS(gradient_checkpointing=True, step_graphs=True)) is True
    assert checkpointing(NS(gradient_checkpointing=False, step_graphs=True)) is False


def test_peft_on_a_gpu_checkpoints_only_where_memory_needs_it(tmp_path):
    """transformers + PEFT keeps PEFT_ACTIVATIONS times the modelled activations: the 8B nf4 micro-batch of 2 Alpaca
    rows fits an H200 without checkpointing, not a 15 GB T4; the 135M model fits anywhere."""
    from speedtune import fit
    from speedtune.bench import SHAPES

    for name in ("llama-3-8b", "smollm2-135m"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**SHAPES[name], "model_type": "llama"}))
    big = str(tmp_path / "llama-3-8b")
    assert fit.peft_checkpointing(big, 2 * 743, 16, True, 139.8)[0] is False
    on, why = fit.peft_checkpointing(big, 2 * 743, 16, True, 15.0)
    assert on and "over 12 GB" in why
    assert fit.peft_checkpointing(str(tmp_path / "smollm2-135m"), 4 * 700, 16, False, 15.0)[0] is False
    # the measured 20.17 GB peak of that 8B micro-batch (peft-best, H200, 2026-12-02) is below what the rule assumes
    assert float(fit.peft_checkpointing(big, 2 * 743, 16, True, 139.8)[1].split("about ")[1].split(" GB")[0]) > 20.17
