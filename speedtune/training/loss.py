"""The output layer and the causal-LM loss, chunk by chunk: the vocabulary-wide logits of a micro-batch are never
held whole. Used by the recorded passes (speedtune.training.graphs), which need fixed shapes and no host reads, so the
libraries that do this (Liger's fused linear cross-entropy, Apple's cut-cross-entropy, Unsloth's chunked loss) don't
fit there: each counts or filters the labelled positions on the host (`.item()`, `nonzero`), which a CUDA graph can't
record. Here every shape is fixed by the batch's shape alone.

`linear_cross_entropy(hidden, weight, targets, n_items)` = cross-entropy of `hidden @ weight.T` summed over the
positions whose target is not IGNORE, divided by `n_items` (a tensor). Forward works in chunks of CHUNK_BYTES of fp32
logits: the logits, their log-sum-exp and the loss, then at once the gradient with respect to the chunk's hidden
states ((softmax - one-hot) @ weight), which is all the backward needs (the output layer is frozen in LoRA). So the
memory is one chunk's logits plus a copy of the hidden states' size, instead of (positions x vocabulary) logits in
16 and 32 bits and their gradient: on the Llama-3-8B shape with 8 Alpaca rows (up to ~6,000 positions, a
128,256-word vocabulary) that is ~0.5 GB instead of ~9 GB. The arithmetic is the eager pass's: logits in the
weight's precision, upcast to fp32 for the softmax, the gradient cast back (tests/test_loss.py). In fp16 the loss
scaler's factor reaches the backward as its incoming gradient; it is applied in fp32, so a factor over fp16's range
(a 65,536 scale over one trained token) doesn't turn the gradient into inf by itself."""

from __future__ import annotations

import torch

from speedtune.data.encode import IGNORE  # the label of an untrained position, as the data path writes it
from speedtune.training import fit

CHUNK_BYTES = fit.LOSS_CHUNK_BYTES  # fp32 logits per chunk (the fit counts this working memory)


def chunk_rows(vocab: int) -> int:
    return max(128, CHUNK_BYTES // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, n_items):
        flat = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1)
        grad = torch.empty_like(flat)
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        step = chunk_rows(weight.shape[0])
        w = weight if weight.dtype == flat.dtype else weight.to(flat.dtype)
        for s in range(0, flat.shape[0], step):
            h, t = flat[s:s + step], tgt[s:s + step]
            logits = (h @ w.T).float()
            valid = (t != IGNORE).unsqueeze(1)
            safe = t.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            total += ((lse - logits.gather(1, safe)) * valid).sum()
            logits.sub_(lse).exp_()  # softmax, in place
            logits.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=logits.dtype))
            logits.mul_(valid)
            grad[s:s + step] = logits.to(w.dtype) @ w
        ctx.save_for_backward(grad, n_items)
        ctx.shape = hidden.shape
        return total / n_items

    @staticmethod
    def backward(ctx, grad_out):
        grad, n_items = ctx.saved_tensors
        scale = grad_out.float() / n_items  # fp16's loss scaler puts its factor (2^16 at first) in grad_out
        if grad.dtype == torch.float16:  # the factor alone may pass fp16's range (65,504): applied in fp32
            return (grad.float() * scale).to(grad.dtype).reshape(ctx.shape), None, None, None
        return (grad * scale.to(grad.dtype)).reshape(ctx.shape), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         n_items: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of `hidden @ weight.T` against `targets` (IGNORE: no loss) over `n_items`. `weight`
    must be frozen (its gradient is not computed)."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the output layer: it must be frozen")
    return _LinearCrossEntropy.apply(hidden, weight, targets, n_items)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target is the next token's label; the last position has none. Same shape as `labels`, so
    the hidden states need no slicing (a view, not a copy)."""
    out = torch.full_like(labels, IGNORE)
    out[:, :-1] = labels[:, 1:]
    return out
