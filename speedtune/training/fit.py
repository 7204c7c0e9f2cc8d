"""The automatic fit: keep the user's recipe (rows per optimizer step, sequence length, learning rate, steps) and
choose how to run it on the GPU at hand, from the model's shape, the GPU's memory, its speed and the real row lengths.

`auto` (the default, fastest): each step's rows are laid out by tokens (speedtune.training.layout): sorted by length and
packed into padded micro-batches, so a step of short rows runs as one pass instead of grad-accum passes of a few rows
each; a pass is priced from the GPU's measured matmul rate. Under the pass graphs (speedtune.training.graphs, auto's
default on a GPU) a step's rows are packed into one sequence instead where that is estimated faster
(packed_over_padded). Gradient checkpointing stays off wherever 80% of the GPU holds the largest pass's activations.
`lean`: the same steps at less memory than Unsloth's defaults: padding-free micro-batches (each one sequence of real
tokens, speedtune.training.trainer.pack), Unsloth's offloaded checkpointing (unless skipping it costs little memory) and
the input embedding table in CPU memory (the modes side by side: docs/design/training.md, "The fit modes"). `memory`:
micro-batch 1, offloaded checkpointing, the input embedding table in CPU memory, the chunked cross-entropy held to 0.5
GB. `off`: the recipe's micro-batch x accumulation as given.

Memory is estimated from the model's configuration: the quantised or 16-bit weights, the LoRA weights with their
AdamW state, and the activations kept per token and layer (5 x hidden + 3 x intermediate values without
checkpointing, the layer input alone with it), with a 10% margin, calibrated on measured peaks (docs/design/
training.md, "The memory estimate"); tests/test_fit.py holds it above every committed peak."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speedtune.training.layout import round_up

HEADROOM = 0.80  # PEFT's checkpointing check (peft_checkpointing): at most this share of the GPU, allocated
# The fit budgets reserved memory (what the caching allocator holds from the GPU: what runs out on a 15 GB card), at
# most this share of the GPU's; the rest is left to the CUDA context, which sits outside the allocator, and to the
# estimate's error.
RESERVED_HEADROOM = 0.92
# Reserved over the allocated estimate (reserved_gb). Eager passes: before it fails, the allocator frees the blocks it
# keeps cached and tries again, so near the cap what stays reserved is what is live plus fragmentation. Pass graphs:
# every recorded shape allocates its pass's activations in the one shared pool, whose segments another shape reuses
# only in part, so what stays reserved over the peak grows with the shapes: GRAPH_POOL_GROWTH x
# shapes^GRAPH_POOL_EXPONENT times the activations, plus GRAPH_RESERVED_GB (an upper bound over the committed runs, 3
# to 16 shapes: docs/design/training.md, "The memory estimate"; tests/test_fit.py holds every committed run under it).
EAGER_RESERVED_GB = 0.5
GRAPH_POOL_GROWTH = 0.55
GRAPH_POOL_EXPONENT = 0.55
GRAPH_RESERVED_GB = 0.5
MAX_GRAPH_SHAPES = 16  # pass graphs recorded at most (speedtune.training.graphs); a shape past that runs eagerly
LOSS_CHUNK_BYTES = 512 * 2**20  # fp32 logits per chunk of the pass graphs' loss (speedtune.training.loss)
MEMORY_LOSS_CHUNK_GB = 0.5  # the memory profile's cap on the chunked cross-entropy's working memory
MAX_BUDGET_TOKENS = 16384
# The host's share of one forward+backward pass, per transformer layer: Python, autograd and kernel launches (about 220
# kernels a layer with Unsloth's LoRA), whatever its tokens. Fitted on: docs/design/training.md, HOST_S_PER_LAYER_PASS.
HOST_S_PER_LAYER_PASS = 0.010
MATMUL_EFFICIENCY = 0.6  # the share of the measured matmul rate a training pass reaches (same profile)
CPU_BUDGET_TOKENS = 4096  # on a CPU: padded tokens per pass
# `lean` keeps checkpointing unless skipping it adds at most this much memory (GB), or this share of the lean peak
LEAN_EXTRA_GB = 2.0
LEAN_EXTRA_SHARE = 0.25
# CUDA graphs keep about this many layers' activations of the largest pass in their pool (an upper bound: 4 on the 8B
# shape, 6 on the real 135M model's padded passes of 18,432 tokens); Unsloth's per-block graphs run only when asked.
GRAPH_POOL_LAYERS = 6
# transformers + PEFT keeps this many times the activations the estimate models (it is calibrated on Unsloth): 2.14x
# measured, with a margin. Fitted on: docs/design/training.md, PEFT_ACTIVATIONS.
PEFT_ACTIVATIONS = 2.5
GRAPH_WIDTHS = 8  # with CUDA graphs, rows are padded to at most this many widths (one graph per width)
# Packed rows attend through a dense block-diagonal mask (SDPA's masked kernel over the whole packed width, no causal
# skipping), padded rows through the causal flash kernel. Per FLOP the masked attention costs this many times a
# matmul's share of the step. Fitted on: docs/design/training.md, MASKED_ATTENTION.
MASKED_ATTENTION = 8.0


@dataclass
class Fit:
    mode: str  # auto, lean, memory or off
    layout: str  # tokens or rows (speedtune.training.layout)
    micro_batch: int  # rows per micro-batch (layout rows)
    token_budget: int | None  # padded tokens per micro-batch (layout tokens)
    gradient_checkpointing: bool
    estimated_gb: float | None
    capacity_gb: float | None
    offload_embeddings: bool = False
    loss_chunk_gb: float | None = None
    pass_overhead_tokens: int | None = None  # one more pass costs as much as this many padded tokens (layout)
    reasons: list[str] = field(default_factory=list)
    reserved_gb: float | None = None  # the estimate plus what the allocator keeps reserved (reserved_gb)
    keep_layers: int = 0  # with checkpointing: layers that keep their activations instead (speedtune.training.costs)

    def as_dict(self) -> dict:
        return asdict(self)


def shape(model_path: str) -> dict:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    h = cfg["hidden_size"]
    return {"hidden": h, "inter": cfg.get("intermediate_size", 4 * h), "layers": cfg["num_hidden_layers"],
            "vocab": cfg["vocab_size"], "kv": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
            "heads": cfg.get("num_attention_heads"), "tied": cfg.get("tie_word_embeddings", False),
            "model_type": cfg.get("model_type")}


def block_params(s: dict) -> int:
    """The transformer blocks' linear weights (q, k, v, o, gate, up, down)."""
    h, i = s["hidden"], s["inter"]
    kv_dim = h * s["kv"] // s["heads"] if s["heads"] else h
    return s["layers"] * (2 * h * h + 2 * h * kv_dim + 3 * h * i)


def linear_params(s: dict) -> int:
    """Every matmul a token goes through: the blocks and the output layer."""
    return block_params(s) + s["vocab"] * s["hidden"]


def estimate_gb(s: dict, tokens: int, lora_r: int, four_bit: bool, checkpointing: bool, act_bytes: int = 2,
                offload_embeddings: bool = False, graphs: bool = False, keep_layers: int = 0,
                packed: bool = False) -> float:
    """Peak allocated GPU memory for a micro-batch of `tokens` padded tokens. CUDA graphs keep a pool of their own
    (measured: +3.2 GB on the checkpointed 8B pass of 6,144 tokens, about GRAPH_POOL_LAYERS layers' activations).
    With checkpointing, `keep_layers` layers keep their activations (partial recomputation, training.costs).
    `packed` with `graphs`: a recorded packed pass attends through a dense (width x width) mask, which each layer
    keeps for its backward (measured: 10 GB more on the 135M shape's passes of 13,056 tokens, 30 layers)."""
    h, i, L, V = s["hidden"], s["inter"], s["layers"], s["vocab"]
    kv_dim = h * s["kv"] // s["heads"] if s["heads"] else h
    block = block_params(s)
    embed = V * h * (1 if s["tied"] or offload_embeddings else 2)
    weights = block * (0.56 if four_bit else 2) + embed * 2
    lora = L * lora_r * (2 * h + (h + kv_dim) * 2 + 2 * (h + i) + (i + h)) * (2 + 4 + 8)  # weights, grads, AdamW
    full = 5 * h + 3 * i  # the values a layer keeps per token for its backward
    acts = tokens * L * full * act_bytes
    if checkpointing:
        keep = min(keep_layers, L)
        acts = tokens * ((L - keep) * h + keep * full) * act_bytes  # a recomputed layer keeps its input alone
        acts += tokens * full * act_bytes  # one layer recomputed at a time
    if graphs:
        acts += GRAPH_POOL_LAYERS * tokens * (5 * h + 3 * i) * act_bytes
        if packed:
            acts += L * tokens * tokens * act_bytes
    logits = tokens * V * 4 / 8  # chunked cross-entropy keeps a slice of the fp32 logits
    if graphs and tokens:  # the pass graphs' loss works a chunk at a time: its fp32 logits and a 16-bit copy
        logits = max(logits, LOSS_CHUNK_BYTES * 1.5)
    return (weights + lora + acts + logits) * 1.10 / 2**30


def peft_checkpointing(model_path: str, tokens: int, lora_r: int, four_bit: bool, capacity_gb: float) -> tuple[bool, str]:
    """Whether the PEFT backend on a GPU needs gradient checkpointing for a micro-batch of `tokens` padded tokens:
    only if its activations would not fit in HEADROOM of the GPU. transformers' unfused layers keep more per token
    than Unsloth's kernels, which the estimate models: PEFT_ACTIVATIONS times as much."""
    s = shape(model_path)
    base = estimate_gb(s, 0, lora_r, four_bit, False)
    need = base + PEFT_ACTIVATIONS * (estimate_gb(s, tokens, lora_r, four_bit, False) - base)
    budget = capacity_gb * HEADROOM
    if need <= budget:
        return False, (f"no gradient checkpointing: the longest micro-batch ({tokens} padded tokens) needs about "
                       f"{need:.1f} GB without it, within {budget:.0f} GB ({HEADROOM:.0%} of the GPU)")
    return True, (f"gradient checkpointing on: the longest micro-batch ({tokens} padded tokens) would need about "
                  f"{need:.1f} GB without it, over {budget:.0f} GB ({HEADROOM:.0%} of the GPU)")


def pass_overhead_tokens(s: dict, tflops: float) -> int:
    """How many padded tokens of GPU work one more forward+backward pass costs in host time: the layout packs a step
    into fewer, longer passes when passes are dear (a fast GPU, a launch-bound step), and trims padding with more passes
    when tokens are dear (a T4). Tokens cost 4 x linear parameters FLOPs each (speedtune.benchmarking.worker)."""
    s_per_token = 4 * linear_params(s) / (tflops * 1e12 * MATMUL_EFFICIENCY)
    return int(HOST_S_PER_LAYER_PASS * s["layers"] / s_per_token)


def reserved_gb(estimate: float, graphs: bool, shapes: int = MAX_GRAPH_SHAPES, base: float = 0.0) -> float:
    """What the allocator keeps reserved for a step whose allocated peak is estimated at `estimate` (see
    RESERVED_HEADROOM): eager passes leave fragments of live segments; pass graphs pin their pool, which grows with
    the number of recorded `shapes` (GRAPH_POOL_GROWTH) over the activations, the estimate less `base` (the same
    estimate at no tokens: the weights and the optimizer's state)."""
    if not graphs:
        return estimate + EAGER_RESERVED_GB
    growth = GRAPH_POOL_GROWTH * max(1, min(shapes, MAX_GRAPH_SHAPES)) ** GRAPH_POOL_EXPONENT
    return estimate + (estimate - base) * growth + GRAPH_RESERVED_GB


def largest_budget(fits) -> int:
    """The most tokens (a multiple of 256, at most MAX_BUDGET_TOKENS) for which `fits(tokens)`; 0 if none."""
    lo, hi = 0, MAX_BUDGET_TOKENS // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * 256) else (lo, mid - 1)
    return lo * 256


def padding_free(mode: str, asked: bool | None, device: str) -> bool:
    """Whether micro-batches run padding-free (speedtune.training.trainer.pack). What the user asked for holds (with
    `--step-graphs` too, the packed rows run as recorded passes of a few fixed widths: speedtune.training.graphs). By
    default only `lean` on a GPU, where it saves the padding's activations. Not eager `auto` on a GPU: padded rows have
    fixed shapes, which run Unsloth's compiled blocks; under `auto`'s pass graphs speedtune.training.plan packs the rows
    where packed_over_padded says it is faster (the Llama-3-8B shape, not the 135M one). Not on a CPU: there attention
    takes the packed rows' block-diagonal mask as a dense one, which is slower (docs/design/training.md)."""
    if asked is not None:
        return asked
    return mode == "lean" and device == "cuda"


def packed_multiple(lengths: list[int], rows: int) -> int:
    """Packed passes are padded up to a multiple of this: about an eighth of a step's real tokens (64-aligned), so a
    pass carries ~1/16 padding on average and most steps' widths fall on a dozen graph shapes or fewer."""
    mean = sum(lengths) / len(lengths)
    return max(64, -(-int(mean * rows / 8) // 64) * 64)


def packed_over_padded(s: dict, lengths: list[int], rows: int) -> float:
    """The estimated time of the step passes with each step's rows packed into one sequence, over that of the same
    rows padded (both recorded passes, one a step): tokens computed, padding and the widths' rounding included, each
    costing 4 x linear parameters FLOPs, plus attention: causal over each padded row (6 x width^2 x hidden x layers),
    dense over the packed width (12 x width^2 x hidden x layers), the latter at MASKED_ATTENTION times the cost.
    Packing saves the padding; its attention grows with the square of the packed width, so it pays where the
    matmuls dominate (large models) and not where attention does (small ones)."""
    per_token = 4 * linear_params(s)
    attention = s["hidden"] * s["layers"]
    wide, pad = width_multiple(max(lengths)), packed_multiple(lengths, rows)
    padded = packed = 0.0
    for i in range(0, len(lengths), rows):
        step = lengths[i:i + rows]
        w = round_up(max(step), wide)
        padded += len(step) * (w * per_token + 6 * w * w * attention)
        w = round_up(sum(step), pad)
        packed += w * per_token + MASKED_ATTENTION * 12 * w * w * attention
    return packed / padded


def width_multiple(longest_row: int) -> int:
    """Rows padded up to a multiple of this leave at most GRAPH_WIDTHS widths up to the longest row (64-aligned)."""
    return max(64, -(-longest_row // GRAPH_WIDTHS // 64) * 64)


def fit(mode: str, model_path: str, *, rows_per_step: int, micro_batch: int, longest_row: int, lora_r: int,
        four_bit: bool, capacity_gb: float | None, act_bytes: int = 2, checkpointing: bool | None = None,
        tflops: float | None = None, graphs: bool = False, packed: bool = False,
        graph_shapes: int = MAX_GRAPH_SHAPES) -> Fit:
    """How to lay out the recipe's steps. `checkpointing`, when the user chose it, is kept whatever the mode;
    `graphs`: the step runs as CUDA graphs (their pool counts in the memory), `graph_shapes` of them at most;
    `packed`: micro-batches are padding-free, so the token budget counts real tokens."""
    s = shape(model_path)
    est = lambda tokens, ck, off=False: estimate_gb(s, tokens, lora_r, four_bit, ck, act_bytes, off,  # noqa: E731
                                                    graphs and mode != "memory", packed=packed)
    if mode == "off":
        ck = bool(checkpointing) if checkpointing is not None else capacity_gb is not None
        return Fit("off", "rows", micro_batch, None, ck, est(micro_batch * longest_row, ck), capacity_gb,
                   reasons=["--fit off: the recipe runs as given (micro-batch x accumulation)"])
    if capacity_gb is None:  # a CPU: memory is rarely the limit; passes cost little, padding costs compute
        tokens = max(CPU_BUDGET_TOKENS, longest_row)
        return Fit(mode, "tokens", micro_batch, tokens, bool(checkpointing), None, None, reasons=[
            f"no GPU: each step's {rows_per_step} rows are sorted by length and packed into micro-batches of at most "
            f"{tokens} {'' if packed else 'padded '}tokens (the loss is normalised over the whole step, as with accumulation)"])
    budget_gb = capacity_gb * RESERVED_HEADROOM
    pooled = graphs and mode != "memory"
    res = lambda tokens, ck, off=False: reserved_gb(est(tokens, ck, off), pooled, graph_shapes,  # noqa: E731
                                                    est(0, ck, off))
    if mode == "memory":
        off = not s["tied"]  # a tied table is also the output layer: it has to stay on the GPU
        ck = True if checkpointing is None else checkpointing
        return Fit("memory", "rows", 1, None, ck, est(longest_row, ck, off), capacity_gb, off, MEMORY_LOSS_CHUNK_GB,
                   reserved_gb=reserved_gb(est(longest_row, ck, off), False), reasons=[
            "memory profile: micro-batch 1 with offloaded gradient checkpointing, the smallest footprint"] +
            (["the input embedding table stays in CPU memory (a lookup; its output is copied to the GPU)"]
             if off else []) +
            [f"the chunked cross-entropy works in at most {MEMORY_LOSS_CHUNK_GB} GB (Unsloth allows up to 4 GB)"])
    options, lean_why, off = [False, True], None, False
    if checkpointing is not None:
        options = [checkpointing]
    elif mode == "lean":
        largest = min(rows_per_step * longest_row, MAX_BUDGET_TOKENS)  # the biggest pass the data can make
        off = not s["tied"]
        fast, lean = est(largest, False), est(largest, True, off)
        if fast - lean > LEAN_EXTRA_GB and fast > (1 + LEAN_EXTRA_SHARE) * lean:
            options = [True]
            lean_why = (f"gradient checkpointing on: the largest step ({rows_per_step} rows of up to {longest_row} "
                        f"tokens) needs about {lean:.1f} GB with it against {fast:.1f} GB without, for some of the "
                        "speed (README: the automatic fit); --fit auto skips it where the GPU has room")
            if off:
                lean_why += ("; the input embedding table stays in CPU memory (a lookup a step, copied to the GPU: "
                             f"{s['vocab'] * s['hidden'] * 2 / 2**30:.1f} GB less)")
    for ck in options:
        tokens = largest_budget(lambda t, ck=ck: res(t, ck) <= budget_gb)
        if tokens >= longest_row:
            why = [f"each step's {rows_per_step} rows are sorted by length and packed into micro-batches of at most "
                   f"{tokens} {'' if packed else 'padded '}tokens (the loss is normalised over the whole step, as with accumulation)",
                   f"{'with' if ck else 'no'} gradient checkpointing: about {est(tokens, ck):.1f} GB allocated and "
                   f"{res(tokens, ck):.1f} GB reserved at that budget fit in {budget_gb:.1f} GB "
                   f"({RESERVED_HEADROOM:.0%} of {capacity_gb:.0f} GB; reserved: speedtune.training.fit.reserved_gb)"
                   + ("" if ck else "; skipping the recomputation saves about 13-35% of each step")]
            if ck and checkpointing is None and lean_why is None:
                why[1] += f" (without it even the longest row, {longest_row} tokens, needs {est(longest_row, False):.1f} GB)"
            if lean_why:
                why.append(lean_why)
            overhead = pass_overhead_tokens(s, tflops) if tflops else None
            if overhead:
                why.append(f"the GPU multiplies at {tflops:.0f} TFLOP/s (measured), so one more pass (~{HOST_S_PER_LAYER_PASS * 1000:.0f} ms "
                           f"of host work a layer) costs as much as {overhead} padded tokens: a step is split only "
                           "where that saves more padding")
            keep_off = off and ck and lean_why is not None
            return Fit(mode, "tokens", micro_batch, tokens, ck, est(tokens, ck, keep_off), capacity_gb, keep_off,
                       pass_overhead_tokens=overhead, reasons=why, reserved_gb=res(tokens, ck, keep_off))
    low = fit("memory", model_path, rows_per_step=rows_per_step, micro_batch=1, longest_row=longest_row,
              lora_r=lora_r, four_bit=four_bit, capacity_gb=capacity_gb, act_bytes=act_bytes, checkpointing=checkpointing)
    low.reasons.insert(0, f"the longest row ({longest_row} tokens) does not fit in {budget_gb:.0f} GB even with "
                          "checkpointing: trying the smallest footprint")
    return low
