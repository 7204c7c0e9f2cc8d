"""speedtune.training.halflora: the LoRA weights' 16-bit copies. On a CPU, with copies in fp32 (the same arithmetic as
the model's own weights), the step's gradients and the weights after an optimizer step must be the plain model's; with
16-bit copies, the parameters, the state dict and the saved adapter stay fp32. The last test runs Unsloth's kernels
(a CUDA GPU: the device runs of benchmarks/results/; skipped on a CPU): a step with the copies gives the loss and the
gradients of the per-use casts."""

from __future__ import annotations

import pytest
import torch

from test_graphs import batch, lora_model


def two_passes(model, micro_batches, lora=None):
    """The loss summed over two micro-batches' backward passes, as the trainer's step runs them."""
    total = 0.0
    if lora is not None:
        lora.refresh()
    for ids, labels, mask in micro_batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        total += float(loss.detach())
        if lora is not None:
            lora.collect()
    if lora is not None:
        lora.publish()
    return total


def lora_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_step_and_the_update_are_the_plain_models(tiny_model):
    from speedtune.training.halflora import HalfLoRA

    torch.manual_seed(1)
    micro = [batch(), batch(n_rows=2, width=9, short_row=(1, 6))]
    plain, halved = lora_model(tiny_model), lora_model(tiny_model)
    lora = HalfLoRA(halved, torch.float32)
    assert len(lora.params) == 2 * 7 * 2  # A and B of the 7 projections, 2 layers
    loss = two_passes(plain, micro)
    assert two_passes(halved, micro, lora) == pytest.approx(loss, rel=1e-6)
    want, got = lora_grads(plain), lora_grads(halved)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7 * float(want[name].abs().max()))
    for model in (plain, halved):  # one AdamW step each, then the next step's loss
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        opt.step()
        model.zero_grad()
    assert two_passes(halved, micro, lora) == pytest.approx(two_passes(plain, micro), rel=1e-5)
    # without refresh the copies would still hold the first step's weights: the loss would be the first one
    assert abs(two_passes(plain, micro) - loss) > 1e-3


def test_16_bit_copies_hide_behind_the_fp32_parameters(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from speedtune.training.halflora import HalfLoRA

    model = lora_model(tiny_model)
    proj = model.base_model.model.model.layers[0].self_attn.q_proj
    param = proj.lora_A["default"].weight
    lora = HalfLoRA(model, torch.bfloat16)
    copy = proj.lora_A["default"].weight
    assert copy is not param and copy.dtype == torch.bfloat16 and copy.requires_grad
    assert torch.equal(copy, param.detach().to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    kept = model.state_dict()["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert kept.dtype == torch.float32 and kept.data_ptr() == param.data_ptr()
    model.save_pretrained(tmp_path / "adapter")  # a checkpoint written while training
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    lora.restore()
    assert proj.lora_A["default"].weight is param


def test_no_lora_weights_is_an_error(tiny_model):
    from transformers import AutoModelForCausalLM

    from speedtune.training.halflora import HalfLoRA

    with pytest.raises(ValueError, match="no trainable fp32 LoRA weights"):
        HalfLoRA(AutoModelForCausalLM.from_pretrained(tiny_model), torch.float16)


@pytest.fixture
def smollm2_shape(smollm2, tmp_path):
    """SmolLM2-135M's shape and tokenizer with seeded random weights (the GPU machine has no copy of the weights; the
    test compares two ways to compute the same numbers)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and Unsloth)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unsloth_kernels_give_the_per_use_casts_numbers(smollm2_shape, dtype):
    """Unsloth's fused LoRA kernels (nf4 base, dropout 0: the same arithmetic both ways): two passes with the copies
    against two with the fp32 weights cast at each use. Same 16-bit weights in every matmul and fp32 sums, so the
    loss is equal and the gradients are equal up to the order of the fp32 sums."""
    from test_graphs_unsloth import real_rows, unsloth_lora

    from speedtune.training.halflora import HalfLoRA

    model, tok = unsloth_lora(smollm2_shape, dtype, dropout=0.0)
    rows = real_rows(tok, n=4)
    micro = []
    for ids, labels in rows[:2]:
        ids, labels = torch.tensor([ids], device="cuda"), torch.tensor([labels], device="cuda")
        micro.append((ids, labels, torch.ones_like(ids)))
    with torch.autocast("cuda", dtype=dtype):
        want_loss = two_passes(model, micro)
        want = lora_grads(model)
        model.zero_grad()
        lora = HalfLoRA(model, dtype)
        got_loss = two_passes(model, micro, lora)
    got = lora_grads(model)
    lora.restore()
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-3 * float(want[name].abs().max()))
