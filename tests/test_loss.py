"""The chunked output layer and loss (speedtune.loss) against the plain one: the full logits through
torch's cross-entropy, over several chunks, in fp32 and bf16, with ignored positions; the same loss and the same
gradient of the hidden states."""

from __future__ import annotations

import pytest
import torch

from speedtune import loss


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
