"""Whole training passes as CUDA graphs (`plan.step_graphs`): each micro-batch shape's forward and backward pass is
recorded once as one CUDA graph and then replayed, so the host launches one graph a pass instead of thousands of
kernels (the profile: a step is bound by the host, `speedtune bench --profile`). Memory is no more than the eager
pass's: all shapes' graphs share one pool, and the gradients live in buffers of their own.

What a graph needs, and how it gets it:
- fixed shapes: rows are padded on the right to a multiple of a few widths (`plan.pad_multiple`), each (rows, width)
  is recorded once (at most MAX_SHAPES; a shape past that runs the same pass eagerly);
- no host reads inside: the padded rows run without a padding mask (under the causal mask a real token never sees
  the padding after it, and padding has no label), the step's trained-token count comes in as a tensor, and the
  output layer runs at every position (the labels-only layer indexes a data-dependent set of positions), chunk by
  chunk with its loss (speedtune.loss), so the vocabulary-wide logits are never held whole;
- fixed gradient memory: the LoRA gradients live in buffers made before recording, which are the parameters' `.grad`
  (the backward adds into a `.grad` that exists in place); each step starts them at zero.
Gradient checkpointing may run inside: recomputing a layer is GPU work (Unsloth's offloaded variant is not: its
copies to CPU memory, so under pass graphs its plain one runs, speedtune.backends.unsloth_backend).
The pass is the same arithmetic as the eager one (tests/test_graphs.py runs the pass outside a graph on a CPU and
compares it with the model's own loss and gradients); recording needs a CUDA GPU. If a recording fails, the run goes
on eagerly with the same pass and says why (`failed`)."""

from __future__ import annotations

import contextlib

import torch

from speedtune.loss import IGNORE, linear_cross_entropy, shifted_targets

MAX_SHAPES = 16  # graphs recorded at most; each shares the one memory pool
WARMUP_PASSES = 2  # eager passes on a side stream before the first recording (lazy initialisation, cuBLAS workspaces)


def pass_loss(model, input_ids, labels, n_items):
    """The causal-LM loss of a right-padded micro-batch without a padding mask: cross-entropy summed over the
    labelled positions and divided by the step's label count (a tensor: no host read), logits in fp32, as
    transformers' loss computes it with `num_items_in_batch`. A frozen, bias-free output layer (every LoRA run of a
    plain head) runs chunk by chunk (speedtune.loss), so the vocabulary-wide logits are never held whole."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return linear_cross_entropy(hidden, head.weight, shifted_targets(labels), n_items)
    logits = head(hidden[:, :-1]).float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum") / n_items


class PassGraphs:
    """One training run's recorded passes. `record=False` runs the same passes, buffers and gradient hand-over
    without recording (a CPU; the tests)."""

    def __init__(self, model, dtype: torch.dtype | None, record: bool = True):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.autocast_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        self.record = record
        self.graphs: dict[tuple, tuple] = {}  # (rows, width) -> (graph, static ids, static labels, static loss)
        self.pool = None
        self.n_items = torch.zeros((), dtype=torch.float32, device=self.grads[0].device if self.grads else "cpu")
        self.failed: str | None = None  # why recording stopped (the run goes on eagerly)
        self.replays = 0
        self.eager_passes = 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = self.n_items.device.type
        return torch.autocast(device, dtype=self.autocast_dtype, cache_enabled=False)

    def _body(self, input_ids, labels):
        with self._autocast():
            loss = pass_loss(self.model, input_ids, labels, self.n_items)
        loss.backward()  # into the buffers (each parameter's .grad is its buffer): a graph adds in place
        return loss.detach()

    def begin_step(self, n_items: int) -> None:
        torch._foreach_zero_(self.grads)
        self._hand_over()
        self.n_items.fill_(max(n_items, 1))

    def run(self, input_ids, labels):
        """One pass of the step: adds its gradients to the buffers; returns its share of the step's loss."""
        key = tuple(input_ids.shape)
        entry = self.graphs.get(key)
        if entry is None and self.record and self.failed is None and len(self.graphs) < MAX_SHAPES:
            entry = self._capture(key, input_ids, labels)
        if entry is None:
            self.eager_passes += 1
            return self._body(input_ids, labels)
        graph, ids, lab, loss = entry
        ids.copy_(input_ids)
        lab.copy_(labels)
        graph.replay()
        self.replays += 1
        return loss.clone()  # the pool is shared: the next replay may reuse this memory

    def end_step(self) -> None:
        """The step's gradients are the parameters' `.grad` (the Trainer clips them, steps and drops them)."""
        self._hand_over()

    def _hand_over(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def _capture(self, key, input_ids, labels):
        saved = [g.clone() for g in self.grads]  # this step's earlier passes; the warm-up adds to the buffers
        ids, lab = input_ids.clone(), labels.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_PASSES if not self.graphs else 1):
                    self._body(ids, lab)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self._body(ids, lab)
        except Exception as e:  # noqa: BLE001 - any failure to record: the same pass runs eagerly
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.failed = f"recording a {key[0]} x {key[1]} pass as a CUDA graph failed ({type(e).__name__}: {first})"
            torch.cuda.synchronize()
            torch._foreach_copy_(self.grads, saved)
            return None
        self.pool = graph.pool()
        torch._foreach_copy_(self.grads, saved)
        entry = (graph, ids, lab, loss)
        self.graphs[key] = entry
        return entry
