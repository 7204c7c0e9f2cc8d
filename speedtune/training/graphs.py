"""Whole training passes as CUDA graphs (`plan.step_graphs`): each micro-batch shape's forward and backward pass is
recorded once as one CUDA graph and then replayed, so the host launches one graph a pass instead of thousands of
kernels (the profile: a step is bound by the host, `speedtune bench --profile`). Memory is no more than the eager
pass's: all shapes' graphs share one pool, and the gradients live in buffers of their own.

What a graph needs, and how it gets it:
- fixed shapes: rows are padded on the right to a multiple of a few widths (`plan.pad_multiple`), each (rows, width)
  is recorded once (at most fit.MAX_GRAPH_SHAPES; a shape past that runs the same pass eagerly). Padding-free
  (`plan.padding_free`): the pass's rows are one sequence of their real tokens with a tail of padding up to a multiple
  of the width, their positions restarting at each row and a block-diagonal causal mask built inside the graph from
  each token's row number (`segments`, a tensor), so a graph holds any rows whose tokens add up to its width (asked
  for with `--padding-free --step-graphs`; Unsloth's decoder is told to keep that mask and the packed length,
  `_keeping_mask`);
- no host reads inside: the padded rows run without a padding mask (under the causal mask a real token never sees
  the padding after it, and padding has no label), the step's trained-token count comes in as a tensor, and the
  output layer runs at every position (the labels-only layer indexes a data-dependent set of positions), chunk by
  chunk with its loss (speedtune.training.loss), so the vocabulary-wide logits are never held whole;
- fixed gradient memory: the LoRA gradients live in buffers made before recording, which are the parameters' `.grad`
  (the backward adds into a `.grad` that exists in place); each step starts them at zero.
Gradient checkpointing may run inside: recomputing a layer is GPU work (Unsloth's offloaded variant is not: its
copies to CPU memory, so under pass graphs its plain one runs, speedtune.training.backends.unsloth_backend).
The pass is the same arithmetic as the eager one (tests/test_graphs.py runs the pass outside a graph on a CPU and
compares it with the model's own loss and gradients); recording needs a CUDA GPU. If a recording fails, the run goes
on eagerly with the same pass and says why (`failed`)."""

from __future__ import annotations

import contextlib
import time

import torch

from speedtune.training import fit
from speedtune.training.loss import IGNORE, linear_cross_entropy, shifted_targets

WARMUP_PASSES = 2  # eager passes on a side stream before the first recording (lazy initialisation, cuBLAS workspaces)


def block_mask(segments: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The attention mask of packed rows, (1, 1, width, width): a token sees the earlier tokens of its own row
    (`segments[0, i]` is token i's row number). Boolean (True: attend) for transformers' attention; additive (0 or
    the dtype's lowest value) in `dtype` for Unsloth's, whose decoder takes a float mask."""
    seg = segments[0]
    keep = (seg[:, None] == seg[None, :]).tril_()
    if dtype is None:
        return keep[None, None]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
        ~keep, torch.finfo(dtype).min)[None, None]


UNSLOTH_PACKED = ("_unsloth_keep_padding_mask", "_unsloth_allow_packed_overlength")


@contextlib.contextmanager
def _keeping_mask(decoder, on: bool):
    """Unsloth's decoder drops the attention mask in training (it expects right padding) and cuts a sequence longer
    than the model's max_seq_length; packed rows need their mask, and their sum may pass that length."""
    if not on:
        yield
        return
    before = {name: decoder.__dict__[name] for name in UNSLOTH_PACKED if name in decoder.__dict__}
    for name in UNSLOTH_PACKED:
        setattr(decoder, name, True)
    try:
        yield
    finally:
        for name in UNSLOTH_PACKED:
            if name in before:
                setattr(decoder, name, before[name])
            else:
                delattr(decoder, name)


def pass_loss(model, input_ids, labels, n_items, positions=None, segments=None, float_mask=False):
    """The causal-LM loss of a right-padded micro-batch without a padding mask: cross-entropy summed over the labelled
    positions and divided by the step's label count (a tensor: no host read), logits in fp32, as transformers' loss
    computes it with `num_items_in_batch`. Packed rows (`segments` given) run with their positions and block-diagonal
    mask (`block_mask`; `float_mask` for Unsloth). A frozen, bias-free output layer (every LoRA run of a plain head)
    runs chunk by chunk (speedtune.training.loss), so the vocabulary-wide logits are never held whole."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    extra = {}
    if segments is not None:
        dtype = decoder.get_input_embeddings().weight.dtype if float_mask else None
        extra = {"position_ids": positions, "attention_mask": block_mask(segments, dtype)}
    with _keeping_mask(decoder, segments is not None and float_mask):
        hidden = decoder(input_ids=input_ids, use_cache=False, **extra).last_hidden_state
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

    def __init__(self, model, dtype: torch.dtype | None, record: bool = True, float_mask: bool = False):
        self.model = model
        self.float_mask = float_mask  # packed rows' mask as Unsloth's decoder takes it (block_mask)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.autocast_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        self.record = record
        self.graphs: dict[tuple, tuple] = {}  # (rows, width, packed) -> (graph, static inputs, static loss)
        self.pool = None
        device = self.grads[0].device if self.grads else "cpu"
        self.n_items = torch.zeros((), dtype=torch.float32, device=device)
        # fp16: the loss scaler's factor for this step (a tensor the graph reads; the Trainer's scaler unscales the
        # gradients, finds overflow and adjusts the factor outside the graph)
        self.loss_scale = torch.ones((), dtype=torch.float32, device=device)
        self.failed: str | None = None  # why recording stopped (the run goes on eagerly)
        self.replays = 0
        self.eager_passes = 0
        # wall seconds spent recording each shape, warm-up passes included (the first pays the lazy initialisation)
        self.capture_each: list[float] = []

    @property
    def capture_s(self) -> float:  # metrics.json's phases: the recording, booked apart from the steps
        return sum(self.capture_each)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = self.n_items.device.type
        return torch.autocast(device, dtype=self.autocast_dtype, cache_enabled=False)

    def _body(self, input_ids, labels, positions=None, segments=None):
        with self._autocast():
            loss = pass_loss(self.model, input_ids, labels, self.n_items, positions, segments, self.float_mask)
        (loss * self.loss_scale).backward()  # into the buffers (each parameter's .grad): a graph adds in place
        return loss.detach()

    def begin_step(self, n_items: int, loss_scale: float = 1.0) -> None:
        torch._foreach_zero_(self.grads)
        self._hand_over()
        self.n_items.fill_(max(n_items, 1))
        self.loss_scale.fill_(loss_scale)

    def run(self, input_ids, labels, positions=None, segments=None):
        """One pass of the step: adds its gradients to the buffers; returns its share of the step's loss. Packed rows
        come with their `positions` and `segments` (row numbers), each (1, width)."""
        inputs = (input_ids, labels) if segments is None else (input_ids, labels, positions, segments)
        key = (*input_ids.shape, segments is not None)
        entry = self.graphs.get(key)
        if entry is None and self.record and self.failed is None and len(self.graphs) < fit.MAX_GRAPH_SHAPES:
            entry = self._capture(key, inputs)
        if entry is None:
            self.eager_passes += 1
            return self._body(*inputs)
        graph, static, loss = entry
        for buf, value in zip(static, inputs):
            buf.copy_(value)
        graph.replay()
        self.replays += 1
        return loss.clone()  # the pool is shared: the next replay may reuse this memory

    def end_step(self) -> None:
        """The step's gradients are the parameters' `.grad` (the Trainer clips them, steps and drops them)."""
        self._hand_over()

    def _hand_over(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def _capture(self, key, inputs):
        t0 = time.perf_counter()
        try:
            return self._record(key, inputs)
        finally:
            torch.cuda.synchronize()  # the warm-up passes ran asynchronously: count them in
            self.capture_each.append(time.perf_counter() - t0)

    def _record(self, key, inputs):
        saved = [g.clone() for g in self.grads]  # this step's earlier passes; the warm-up adds to the buffers
        static = tuple(x.clone() for x in inputs)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_PASSES if not self.graphs else 1):
                    self._body(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self._body(*static)
        except Exception as e:  # noqa: BLE001 - any failure to record: the same pass runs eagerly
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.failed = f"recording a {key[0]} x {key[1]} pass as a CUDA graph failed ({type(e).__name__}: {first})"
            torch.cuda.synchronize()
            torch._foreach_copy_(self.grads, saved)
            return None
        self.pool = graph.pool()
        torch._foreach_copy_(self.grads, saved)
        entry = (graph, static, loss)
        self.graphs[key] = entry
        return entry
