"""The chunked output layer and loss (speedtune.training.loss) against the plain one: the full logits through
torch's cross-entropy, over several chunks, in fp32 and bf16, with ignored positions; the same loss and the same
gradient of the hidden states."""

from __future__ import annotations

import pytest
import torch

from speedtune.training import loss


def plain(hidden, weight, targets, n):
    logits = (hidden @ weight.T).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=loss.IGNORE, reduction="sum") / n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunks_give_the_plain_loss_and_gradient(monkeypatch, dtype, tol):
    torch.manual_seed(0)
    vocab = 1000
    assert loss.chunk_rows(128256) == 1046 and loss.chunk_rows(10**7) == 128  # Llama-3's vocabulary; the floor
    monkeypatch.setattr(loss, "chunk_rows", lambda v: 7)  # 7 positions a chunk: 5 chunks, the last a short one
    hidden = torch.randn(3, 10, 32, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, 32, dtype=dtype) / 4
    labels = torch.randint(0, vocab, (3, 10))
    labels[:, :4] = loss.IGNORE  # a prompt
    labels[1, 7:] = loss.IGNORE  # a shorter row
    targets = loss.shifted_targets(labels)
    assert (targets[:, -1] == loss.IGNORE).all() and torch.equal(targets[:, :-1], labels[:, 1:])
    n = torch.tensor(float((targets != loss.IGNORE).sum()))

    want = plain(hidden, weight, targets, n)
    (g_want,) = torch.autograd.grad(want * 3, hidden)  # an upstream gradient other than 1 reaches the chunks
    got = loss.linear_cross_entropy(hidden, weight, targets, n)
    (g_got,) = torch.autograd.grad(got * 3, hidden)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 0
    assert g_got.dtype == hidden.dtype and g_got.shape == hidden.shape
    assert torch.allclose(g_got.float(), g_want.float(), rtol=tol, atol=tol * 1e-2)
    assert g_got[:, -1].abs().max() == 0 and g_got[1, 7:].abs().max() == 0  # no label: no gradient
    other = labels.clone()
    other[0, 5] = (other[0, 5] + 1) % vocab  # another target: another loss, so the comparison can fail
    assert loss.linear_cross_entropy(hidden, weight, loss.shifted_targets(other), n).item() != pytest.approx(
        got.item(), rel=1e-6)


def test_a_trained_output_layer_is_refused():
    weight = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(ValueError, match="must be frozen"):
        loss.linear_cross_entropy(torch.randn(1, 3, 4), weight, torch.zeros(1, 3, dtype=torch.long), torch.tensor(1.0))


def test_fp16_under_the_loss_scaler_gives_the_scaled_gradient():
    """fp16 trains with a loss scaler: the backward's incoming gradient is its factor (2^16 at first). Over one
    trained token that factor alone is past fp16's largest number (65,504); the chunked loss still gives the fp32
    gradient times the factor, finite, as the scaler expects (it skips a step only on a real overflow)."""
    torch.manual_seed(0)
    hidden = (torch.randn(1, 6, 16) / 4).half().requires_grad_(True)
    weight = (torch.randn(50, 16) / 4).half()
    labels = torch.full((1, 6), loss.IGNORE)
    labels[0, 3] = 7  # one trained token
    targets = loss.shifted_targets(labels)
    n = torch.tensor(1.0)
    scale = torch.tensor(65536.0)
    got = loss.linear_cross_entropy(hidden, weight, targets, n)
    (g_got,) = torch.autograd.grad(got, hidden, grad_outputs=scale)
    ref = hidden.detach().float().requires_grad_(True)
    (g_want,) = torch.autograd.grad(plain(ref, weight.float(), targets, n), ref, grad_outputs=scale)
    assert g_got.dtype == torch.float16 and torch.isfinite(g_got).all()
    assert g_want.abs().max() > 100  # the comparison is of scaled values, not of zeros
    assert torch.allclose(g_got.float(), g_want, rtol=1e-2, atol=1e-1)


def test_unsloths_fused_loss_gets_the_fp16_loss_scaler(tiny_model):
    """Unsloth's fused cross-entropy reads the loss scaler from the causal-LM module itself (`self.accelerator_scaler`
    in its forward): attached through PEFT's wrappers down to it and the decoder under it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from speedtune.training.trainer import attach_loss_scaler

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    causal_lm = model.get_base_model()
    assert getattr(causal_lm, "accelerator_scaler", None) is None
    attach_loss_scaler(model, scaler)
    assert causal_lm.accelerator_scaler is scaler and causal_lm.model.accelerator_scaler is scaler
    assert model.accelerator_scaler is scaler
