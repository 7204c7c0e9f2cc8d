"""Whole passes as CUDA graphs (speedtune.training.graphs): the pass is the model's own loss and gradients, the buffers and the
hand-over to the optimizer give the step accumulation computes, and training with them (the same pass outside a
graph on a CPU) takes the same steps as without. The recording itself needs a CUDA GPU: the last test runs there
(the device runs of benchmarks/results/), and is skipped on a CPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_user_error, cli_here
from test_train import DATA, train_args


def lora_model(path, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def batch(n_rows=3, width=12, prompt=5, short_row=(2, 9), device="cpu"):
    from speedtune.training.graphs import IGNORE

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
    from speedtune.training.graphs import IGNORE, pass_loss

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


def test_packed_rows_give_the_padded_batchs_loss_and_gradients(tiny_model):
    """Rows packed into one sequence with a tail of padding (trainer.pack with a width), their positions restarting
    and the block-diagonal mask built from their row numbers, in either form (boolean for transformers' attention,
    additive for Unsloth's): the padded, masked batch's loss and LoRA gradients. A mask that let a row see the one
    before it would change them."""
    from speedtune.training.graphs import IGNORE, block_mask, pass_loss
    from speedtune.training.trainer import pack

    model = lora_model(tiny_model)
    ids, labels, mask = batch(3, 12, 5, (1, 7))
    n = int((labels[:, 1:] != IGNORE).sum())
    full, g_full = own_loss_and_grads(model, ids, labels, mask, n)
    lengths = [int(x) for x in mask.sum(1)]
    micro = pack({"input_ids": ids, "labels": labels}, lengths, [0, 1, 2], False, width=40, pad_id=2)
    assert micro["input_ids"].shape == (1, 40) and micro["segments"][0, -1] == 3
    assert int((micro["labels"][:, 1:] != IGNORE).sum()) == n  # the step's label count: rows start with prompt
    for float_mask in (False, True):
        model.zero_grad()
        loss = pass_loss(model, micro["input_ids"], micro["labels"], torch.tensor(float(n)), micro["position_ids"],
                         micro["segments"], float_mask)
        loss.backward()
        g_mine = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        assert loss.item() == pytest.approx(full, rel=1e-5) and full > 0
        assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(g_full, g_mine))
    keep = block_mask(micro["segments"], None)[0, 0]
    assert keep[11, 11] and keep[11, 0] and not keep[12, 11] and not keep[0, 1]  # row 0 is 12 tokens, row 1 starts
    leaky = micro["segments"].clone()
    leaky[0, 12:19] = 0  # row 1 in row 0's segment: it would see row 0
    with torch.no_grad():
        other = pass_loss(model, micro["input_ids"], micro["labels"], torch.tensor(float(n)), micro["position_ids"],
                          leaky)
    assert other.item() != pytest.approx(full, rel=1e-4)


def test_unsloths_decoder_keeps_the_packed_mask_and_length_for_the_pass_only():
    """Unsloth's decoder drops a training mask and cuts sequences past max_seq_length unless told not to (seen on the
    H200: a 2,560-token packed pass was cut to 2,048); the flags hold during the pass and what was there before
    comes back."""
    from types import SimpleNamespace as NS

    from speedtune.training.graphs import UNSLOTH_PACKED, _keeping_mask

    decoder = NS(_unsloth_keep_padding_mask=False)
    with _keeping_mask(decoder, True):
        assert all(getattr(decoder, name) is True for name in UNSLOTH_PACKED)
    assert decoder._unsloth_keep_padding_mask is False and not hasattr(decoder, "_unsloth_allow_packed_overlength")
    with _keeping_mask(decoder, False):
        assert not hasattr(decoder, "_unsloth_allow_packed_overlength")


def test_the_buffers_accumulate_a_step_and_start_the_next_at_zero(tiny_model):
    """Two passes of one step add into the gradient buffers (normalised over the step's labels), the parameters get
    them as .grad; the next step starts again from zero rather than adding to the last."""
    from speedtune.training.graphs import IGNORE, PassGraphs

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
    graphs.begin_step(n, loss_scale=1024.0)  # fp16: the gradients of the loss times the scaler's factor
    total = sum(graphs.run(ids, labels).item() for ids, labels, _ in (a, b))
    graphs.end_step()
    assert total == pytest.approx(expected, rel=1e-6)  # the loss itself is reported unscaled
    assert all(torch.allclose(x * 1024, p.grad, rtol=1e-4, atol=1e-3)
               for x, p in zip(want, [p for p in model.parameters() if p.requires_grad]))


def test_training_through_the_pass_buffers_takes_the_same_steps(tiny_model, tmp_path, monkeypatch):
    """The trainer with plan.step_graphs (forced: a CPU records no graphs, so the same pass runs eagerly through the
    same buffers) against the plain trainer: the same losses and gradient norms; the run says how its passes ran."""
    import dataclasses

    import yaml

    from speedtune.training import plan as plan_mod
    from speedtune.training.config import RunConfig
    from speedtune.training.train import train

    real = plan_mod.resolve
    runs = {}
    for on, ck in ((False, False), (True, False), (True, True), ("packed", False)):
        def resolve(*a, _on=on, **kw):
            return dataclasses.replace(real(*a, **kw), step_graphs=bool(_on), pad_multiple=64 if _on else None,
                                       label_logits=False, padding_free=_on == "packed")

        monkeypatch.setattr(plan_mod, "resolve", resolve)
        out = train(RunConfig(model=str(tiny_model), data=str(DATA), output=str(tmp_path / f"{on}-{ck}"), max_steps=3,
                              seq_len=128, batch_size=2, grad_accum=2, lr=1e-3, precision="fp32", fit="off",
                              device="cpu", backend="peft", gradient_checkpointing=ck),
                    show_progress=False)
        runs[on, ck] = json.loads((out / "metrics.json").read_text())
    plain = runs[False, False]
    assert plain["step_graphs"] is None
    for on, ck in ((True, False), (True, True), ("packed", False)):  # checkpointing recomputes in the same pass
        graphed = runs[on, ck]
        assert graphed["step_graphs"] == {"shapes": [], "replays": 0, "eager_passes": 3 * 2, "failed": None,
                                          "packed": on == "packed", "capture_s": 0.0, "capture_each_s": []}
        assert "capture_s" not in graphed["phases"]  # nothing recorded: no recording phase
        assert yaml.safe_load((tmp_path / f"{on}-{ck}" / "run_config.yaml").read_text())["plan"]["step_graphs"]
        for a, b in zip(plain["loss"], graphed["loss"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert graphed["loss"][0]["grad_norm"] > 0


def test_step_graphs_asked_where_they_cant_run_is_a_one_line_error(tiny_model, tmp_path):
    r = cli_here(*train_args(tiny_model, tmp_path / "cpu", 1, "--step-graphs", "--device", "cpu"))
    assert_user_error(r, "--step-graphs needs a CUDA GPU")
    assert not (tmp_path / "cpu").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs a CUDA GPU")
def test_a_recorded_pass_replays_the_eager_pass(tiny_model):
    """On a GPU: a recorded pass, replayed on new rows of the same shape, gives the eager pass's loss and gradients;
    a second shape is recorded into the same pool."""
    from speedtune.training.graphs import IGNORE, PassGraphs

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
    assert sorted(graphs.graphs) == [(3, 12, False), (3, 16, False)] and graphs.replays == 4
    assert graphs.eager_passes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs a CUDA GPU")
def test_a_recorded_packed_pass_replays_the_padded_batch(tiny_model):
    """On a GPU: packed rows of one width, recorded once and replayed on other rows (other lengths, same width), give
    each padded batch's loss and gradients: the positions and the mask are the graph's inputs."""
    from speedtune.training.graphs import IGNORE, PassGraphs
    from speedtune.training.trainer import pack

    model = lora_model(tiny_model).cuda()
    graphs = PassGraphs(model, None)
    for short in ((1, 7), (0, 10), (2, 4)):
        ids, labels, mask = batch(3, 12, 3, short, device="cuda")
        n = int((labels[:, 1:] != IGNORE).sum())
        full, g_full = own_loss_and_grads(model, ids, labels, mask, n)
        model.zero_grad(set_to_none=True)
        micro = pack({"input_ids": ids, "labels": labels}, [int(x) for x in mask.sum(1)], [0, 1, 2], False, 48, 2)
        graphs.begin_step(n)
        loss = graphs.run(micro["input_ids"], micro["labels"], micro["position_ids"], micro["segments"]).item()
        graphs.end_step()
        assert graphs.failed is None
        assert loss == pytest.approx(full, rel=1e-5)
        assert all(torch.allclose(a, p.grad, rtol=1e-3, atol=1e-6)
                   for a, p in zip(g_full, [p for p in model.parameters() if p.requires_grad]))
    assert list(graphs.graphs) == [(1, 48, True)] and graphs.replays == 3 and graphs.eager_passes == 0


def test_step_graphs_default_and_conflicts():
    """On by default on a GPU with the fit on, in one process, without fp16 (there only when asked), either backend,
    checkpointing or not; asked for where it can't run, the error names what is missing."""
    from types import SimpleNamespace as NS

    from speedtune.errors import UserError
    from speedtune.training.plan import resolve_step_graphs

    gpu, cpu, t4 = NS(device="cuda", dtype="bfloat16"), NS(device="cpu", dtype="float32"), NS(device="cuda", dtype="float16")
    cfg = lambda asked=None, fit="auto": NS(step_graphs=asked, fit=fit)  # noqa: E731
    assert resolve_step_graphs(cfg(), gpu, 1, False, False)
    assert not resolve_step_graphs(cfg(fit="off"), gpu, 1, False, False)  # the baselines stay vanilla
    assert not resolve_step_graphs(cfg(fit="lean"), gpu, 1, False, False)
    assert not resolve_step_graphs(cfg(), cpu, 1, False, False)
    assert not resolve_step_graphs(cfg(), t4, 1, False, False)
    assert not resolve_step_graphs(cfg(False), gpu, 1, False, False)
    assert not resolve_step_graphs(cfg(), gpu, 1, False, True)  # padding-free alone runs eagerly, as measured
    assert resolve_step_graphs(cfg(True), gpu, 1, False, True)  # both asked for: packed passes in graphs
    assert resolve_step_graphs(cfg(True, fit="off"), gpu, 1, False, False)
    assert resolve_step_graphs(cfg(True), t4, 1, False, False)  # fp16 when asked: the loss scale is a graph input
    for hw, world, block, needle in ((cpu, 1, False, "a CUDA GPU"),
                                     (gpu, 2, False, "one process"), (gpu, 1, True, "no --cuda-graphs")):
        with pytest.raises(UserError, match=needle):
            resolve_step_graphs(cfg(True), hw, world, block, False)


def test_packed_graph_widths_are_an_eighth_of_a_step():
    """Packed passes round up to about an eighth of a step's real tokens (64-aligned): on the bench's Alpaca rows,
    8 a step, that is 256 tokens: ~8% padding and 7 widths over 60 steps (the rows the 8B suite trains)."""
    import random

    from speedtune.training import fit, layout
    from speedtune.paths import demo_dir

    lengths = [int(x) for x in (demo_dir() / "alpaca-lengths.txt").read_text().split()]
    m = fit.packed_multiple(lengths, 8)
    assert m == 256 and fit.packed_multiple([30] * 4, 4) == 64
    random.Random(0).shuffle(lengths)
    steps = [lengths[i:i + 8] for i in range(0, 480, 8)]
    widths = [layout.round_up(sum(s), m) for s in steps]
    assert len(set(widths)) <= 12 and sum(widths) < 1.12 * sum(map(sum, steps))


def test_unsloth_checkpoints_plainly_under_pass_graphs():
    """Unsloth's offloaded checkpointing copies layer inputs to CPU memory, which a graph can't hold: under pass
    graphs its plain recomputation runs instead."""
    from types import SimpleNamespace as NS

    from speedtune.training.backends.unsloth_backend import checkpointing

    assert checkpointing(NS(gradient_checkpointing=True, step_graphs=False)) == "unsloth"
    assert checkpointing(NS(gradient_checkpointing=True, step_graphs=True)) is True
    assert checkpointing(NS(gradient_checkpointing=False, step_graphs=True)) is False


def test_peft_on_a_gpu_checkpoints_only_where_memory_needs_it(tmp_path):
    """transformers + PEFT keeps PEFT_ACTIVATIONS times the modelled activations: the 8B nf4 micro-batch of 2 Alpaca
    rows fits an H200 without checkpointing, not a 15 GB T4; the 135M model fits anywhere."""
    from speedtune.training import fit
    from speedtune.benchmarking.runner import SHAPES

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
