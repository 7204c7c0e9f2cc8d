"""16-bit working copies of the LoRA weights, cast once a step (`plan.half_lora`).

The adapters train in fp32 (the optimizer's weights), but Unsloth's LoRA kernels compute in the pass's 16-bit dtype:
each use of an A or B matrix casts it (`A.to(dtype)`), in the forward, again in the backward, and autograd casts each
16-bit gradient back to fp32. On the 8B shape that is 1,344 small copy kernels a pass (32 layers x 7 projections x 2
matrices x 3). Here each LoRA Linear's `weight` attribute reads a 16-bit copy instead, a view of one flat buffer that
is refreshed from the fp32 weights in one cast at the start of each step; each pass's 16-bit gradients are gathered
into one flat fp32 sum (a concatenation, a cast and an add), which becomes the fp32 weights' `.grad` at the end of the
step. The numbers are those of the per-use casts: the same 16-bit weights in every matmul, the gradients summed in
fp32 across the step's passes. The fp32 weights stay the module's parameters: the optimizer, gradient clipping, the
loss scaler's unscale, checkpoints and the saved adapter see them unchanged; `restore` removes the copies when
training ends.

The copy shadows the parameter by sitting in the module's instance `__dict__` (attribute lookup finds it before
`nn.Module.__getattr__` reaches `_parameters`); `state_dict` and `parameters()` read `_parameters`, so they never see
it."""

from __future__ import annotations

import re

import torch

LORA_WEIGHT = re.compile(r"(^|\.)lora_[AB]\.[^.]+$")


def lora_linears(model) -> list[torch.nn.Module]:
    """The trainable fp32 LoRA A and B Linears (PEFT names them `<proj>.lora_A.<adapter>`)."""
    found = []
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if LORA_WEIGHT.search(name) else None
        if w is not None and w.requires_grad and w.dtype == torch.float32:
            found.append(module)
    return found


class HalfLoRA:
    """Installs the working copies on `model`'s LoRA Linears (in `dtype`); see the module's note for the step."""

    def __init__(self, model, dtype: torch.dtype):
        self.modules = lora_linears(model)
        self.params = [m._parameters["weight"] for m in self.modules]
        if not self.params:
            raise ValueError("no trainable fp32 LoRA weights to make 16-bit copies of")
        sizes = [p.numel() for p in self.params]
        self.half = torch.empty(sum(sizes), dtype=dtype, device=self.params[0].device)
        self.copies = [c.view_as(p) for c, p in zip(self.half.split(sizes), self.params)]
        for copy, module in zip(self.copies, self.modules):
            copy.requires_grad_(True)
            module.__dict__["weight"] = copy
        self.sizes = sizes
        self.grad = None  # this step's gradients so far: one flat fp32 tensor
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """The copies <- the fp32 weights (after an optimizer step, or a checkpoint's weights loaded)."""
        self.half.copy_(torch.cat([p.reshape(-1) for p in self.params]))

    @torch.no_grad()
    def collect(self) -> None:
        """After a backward pass: its 16-bit gradients added, in fp32, to the step's sum; the copies' cleared."""
        grads = [c.grad if c.grad is not None else torch.zeros_like(c) for c in self.copies]
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        self.grad = flat if self.grad is None else self.grad.add_(flat)
        for c in self.copies:
            c.grad = None

    def publish(self) -> None:
        """At the step's end: the summed gradients become the fp32 weights' `.grad` (added to any already there)."""
        if self.grad is None:
            return
        for p, g in zip(self.params, self.grad.split(self.sizes)):
            g = g.view_as(p)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        self.grad = None

    def restore(self) -> None:
        """The modules' `weight` is their fp32 parameter again; the copies are freed."""
        for module in self.modules:
            module.__dict__.pop("weight", None)
        self.copies, self.half, self.grad = [], None, None
