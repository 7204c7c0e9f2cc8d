"""What a step costs in time, where that decides the layout (speedtune.training.fit holds the memory side):

- `gpu_bound_fit`: on a GPU without bf16 (fp16: a T4/V100-class card, where pass graphs don't run) a step is the
  GPU's arithmetic; the host's work per pass hides behind it. So the step is priced in GPU work: the real tokens of
  packed passes (no padding), each more pass at the price of dequantising every nf4 weight again for its forward
  and its backward, and each recomputed layer at its share of RECOMPUTE. It chooses how many layers keep their
  activations (all: no checkpointing; some: Unsloth's `checkpoint_skip_layers`; none: every layer recomputed) and
  the passes' token budget that fits the reserved memory, whichever costs the least on the run's own rows. Both
  prices scale with the GPU's speed, so the choice is the same on a T4 and on a big GPU held to its profile.
- `packed_width` and `graphs_pay`: the default pass graphs (speedtune.training.graphs) record each pass width once,
  which costs about CAPTURE_PASSES eager passes; they are used only where the host time they save over the run's steps
  pays for that, and packed passes are rounded to the multiple that costs the least over the run (fewer shapes for a
  short run, less padding for a long one).
- `compile_pays` (asked by `block_compile`, which first takes what the environment or the other choices force): Unsloth
  compiles each transformer block (torch.compile) on its first pass, which costs about
  COMPILE_S whatever the model's size; it is asked for only where the GPU time its fused kernels save over the run's
  steps pays for that.

The run's steps are a sample of its own rows (`run_steps`)."""

from __future__ import annotations

import math
import random

from speedtune.training import backends, fit, layout

# Recomputing every layer adds this share of a step's GPU time (the 8B shape under pass graphs, the host hidden).
# Fitted on: docs/design/training.md, RECOMPUTE.
RECOMPUTE = 0.4
# Bytes moved per weight each time a pass uses it: nf4 dequantised to 16 bits (0.5 read, 2 written) before its
# matmul; a 16-bit weight is read by the matmul (its price in a small pass).
DEQUANT_BYTES = 2.5
WEIGHT_BYTES = 2.0
# A GPU's matmul rate over its memory bandwidth (T4: ~65 TFLOP/s fp16 over 320 GB/s; H200: ~990 over 4.8 TB/s).
FLOP_PER_BYTE = 200
# An eager pass of Unsloth's compiled blocks takes at least this much host time a layer.
# Fitted on: docs/design/training.md, EAGER_HOST_S_PER_LAYER.
EAGER_HOST_S_PER_LAYER = 0.008
# Recording one pass width costs about this many eager passes more than running it eagerly (warm-up passes, the
# recorded pass, instantiation); conservative for graphs. Fitted on: docs/design/training.md, CAPTURE_PASSES.
CAPTURE_PASSES = 5
# Unsloth's per-block compile on the first pass costs about this many seconds (the same block code whatever the
# model's size), and its fused kernels save this share of a step's GPU time. Fitted on: docs/design/training.md,
# COMPILE_S and COMPILE_GAIN.
COMPILE_S = 20.0
COMPILE_GAIN = 0.03
MAX_SAMPLE_STEPS = 256
CLOSE = 0.02  # splits whose estimated GPU work is this close count as equal (the estimate is no finer)


def run_steps(lengths: list[int], rows: int, steps: int, seed: int) -> list[list[int]]:
    """The run's steps as their rows' token lengths: the rows shuffled (seeded: a sample like the Trainer's shuffle,
    not its order), `steps` of them at most MAX_SAMPLE_STEPS, the epochs wrapping around."""
    if not lengths or rows < 1:
        return []
    order = list(lengths)
    random.Random(seed).shuffle(order)
    n = min(max(steps, 1), MAX_SAMPLE_STEPS)
    return [[order[(k * rows + j) % len(order)] for j in range(rows)] for k in range(n)]


def s_per_token(s: dict, tflops: float) -> float:
    """GPU seconds of one trained token: 4 x linear parameters FLOPs at the pass's share of the matmul rate."""
    return 4 * fit.linear_params(s) / (tflops * 1e12 * fit.MATMUL_EFFICIENCY)


def pass_tokens(s: dict, four_bit: bool) -> float:
    """One more forward+backward pass's GPU work, in trained tokens' worth: every block weight is used twice
    (forward, backward), each use moving DEQUANT_BYTES (nf4) or WEIGHT_BYTES. About 140 tokens for the 8B shape in
    nf4, whatever the GPU (both prices scale with its speed)."""
    moved = 2 * (DEQUANT_BYTES if four_bit else WEIGHT_BYTES) * fit.block_params(s)
    return moved * FLOP_PER_BYTE * fit.MATMUL_EFFICIENCY / (4 * fit.linear_params(s))


def gpu_bound_fit(model_path: str, *, steps: list[list[int]], rows_per_step: int, micro_batch: int,
                  longest_row: int, lora_r: int, four_bit: bool, capacity_gb: float, act_bytes: int = 2,
                  checkpointing: bool | None = None, offload: bool | None = None) -> fit.Fit:
    """Packed passes for a GPU-bound step (see the module's note). `checkpointing` as the user asked: True keeps no
    layer's activations (every layer recomputed), False keeps all. `offload` (the input embedding table in CPU
    memory) as the user asked; by default where it buys a larger budget, so fewer passes (an untied table only)."""
    s = fit.shape(model_path)
    n_layers = s["layers"]
    budget_gb = capacity_gb * fit.RESERVED_HEADROOM
    per_pass = pass_tokens(s, four_bit)
    keeps = {None: range(n_layers, -1, -1), True: [0], False: [n_layers]}[checkpointing]
    steps = steps or [[longest_row] * rows_per_step]
    offs = [offload] if offload is not None else [False] + ([True] if not s["tied"] else [])
    options = []  # (estimated GPU work in tokens, layers kept, token budget, passes a step, embeddings offloaded)
    for keep, off in ((k, o) for k in keeps for o in offs):
        ck = keep < n_layers
        est = lambda t, ck=ck, keep=keep, off=off: fit.estimate_gb(  # noqa: E731
            s, t, lora_r, four_bit, ck, act_bytes, keep_layers=keep, offload_embeddings=off)
        budget = fit.largest_budget(lambda t, est=est: fit.reserved_gb(est(t), False) <= budget_gb)
        if budget < longest_row:
            continue
        recomputed = (n_layers - keep) / n_layers
        passes = sum(len(layout.by_tokens(step, budget, round(per_pass), packed=True)) for step in steps)
        cost = sum(map(sum, steps)) * (1 + RECOMPUTE * recomputed) + passes * per_pass * (1 + recomputed / 2)
        if off and options and options[-1][1] == keep and options[-1][3] <= passes / len(steps):
            continue  # offloading buys no fewer passes here
        options.append((cost, keep, budget, passes / len(steps), off))
    if not options:
        low = fit.fit("memory", model_path, rows_per_step=rows_per_step, micro_batch=1, longest_row=longest_row,
                      lora_r=lora_r, four_bit=four_bit, capacity_gb=capacity_gb, act_bytes=act_bytes,
                      checkpointing=checkpointing)
        low.reasons.insert(0, f"the longest row ({longest_row} tokens) does not fit in {budget_gb:.1f} GB even with "
                              "every layer recomputed: trying the smallest footprint")
        return low
    # within the estimate's noise, the split that recomputes the fewest layers; of two such, the one with fewer passes
    least = min(o[0] for o in options)
    close = [o for o in options if o[0] <= least * (1 + CLOSE)]
    cost, keep, budget, passes, off = min(close, key=lambda o: (-o[1], o[0]))
    ck = keep < n_layers
    est = fit.estimate_gb(s, budget, lora_r, four_bit, ck, act_bytes, keep_layers=keep, offload_embeddings=off)
    reserved = fit.reserved_gb(est, False)
    why = [f"a GPU without bf16 (T4 class) is bound by its arithmetic, not by the host: each step's "
           f"{rows_per_step} rows run packed (no padding) in passes of at most {budget} tokens, "
           f"{passes:.2f} passes a step on these rows (speedtune.training.costs.gpu_bound_fit); one more pass costs about "
           f"{per_pass:.0f} tokens of work (every {'nf4 weight dequantised' if four_bit else 'weight read'} again "
           f"for its forward and backward), recomputing every layer about {RECOMPUTE:.0%} of a step",
           f"about {est:.1f} GB allocated and {reserved:.1f} GB reserved at that budget fit in {budget_gb:.1f} GB "
           f"({fit.RESERVED_HEADROOM:.0%} of {capacity_gb:.1f} GB)"]
    if off and offload is None:
        why.append("the input embedding table in CPU memory (the same numbers; its rows are copied over each pass): "
                   "the GB it frees go to a larger pass budget, so fewer passes")
    chosen = (cost, keep, budget, passes, off)
    if not ck:
        fewer = [o for o in options if o[3] < passes]
        why.append("no gradient checkpointing" + (
            ": " + _versus(min(fewer), chosen, n_layers) if fewer else ": it fits the fewest passes already"))
    else:
        plain = [o for o in options if o[1] == n_layers]
        what = (f"checkpointing all but {keep} of {n_layers} layers (Unsloth's checkpoint_skip_layers)" if keep
                else "gradient checkpointing on every layer" + (" as asked" if checkpointing else ""))
        why.append(what + " with Unsloth's offloaded checkpointing (a recomputed layer's input waits in CPU memory; "
                   "the copies hide behind a GPU-bound step)" + (
                       ": " + _versus(plain[0], chosen, n_layers) if plain else
                       "" if checkpointing else f": without it even the longest row ({longest_row} tokens) would not "
                                                "fit"))
    return fit.Fit("auto", "tokens", micro_batch, budget, ck, est, capacity_gb, off,
                   pass_overhead_tokens=round(per_pass),
                   reasons=why, reserved_gb=reserved, keep_layers=keep if ck else 0)


def _versus(alt, chosen, n_layers) -> str:
    """The chosen split against another, in estimated GPU work."""
    kind = "no checkpointing" if alt[1] == n_layers else f"{n_layers - alt[1]} of {n_layers} layers recomputed"
    return (f"{kind}, {alt[3]:.2f} passes a step of at most {alt[2]} tokens, is estimated at {alt[0] / chosen[0]:.2f} "
            "times this split's GPU work")


def packed_width(steps: list[list[int]], n_steps: int, per_token: float, capture: float, base: int) -> int:
    """The width multiple of packed pass graphs that costs the least over the run: the GPU time of the padding it
    adds (`per_token` seconds a computed token) plus `capture` seconds per distinct width. Candidates: 1-4 times
    `base` (fit.packed_multiple, about an eighth of a step's tokens)."""
    best = None
    for m in (base * k for k in range(1, 5)):
        widths = [layout.round_up(sum(step), m) for step in steps]
        total = n_steps / len(steps) * sum(widths) * per_token + min(len(set(widths)), fit.MAX_GRAPH_SHAPES) * capture
        if best is None or total < best[0]:
            best = (total, m)
    return best[1]


def graphs_pay(steps: list[list[int]], n_steps: int, eager: list[float], recorded: list[float], widths: list[int],
               capture: float) -> tuple[bool, str]:
    """Whether pass graphs pay for their capture within the run: the sampled steps' eager and recorded seconds
    (`eager`, `recorded`), over `n_steps`, against `capture` seconds for each distinct pass width (`widths`)."""
    saved = sum(max(0.0, e - r) for e, r in zip(eager, recorded)) * n_steps / len(steps)
    shapes = min(len(set(widths)), fit.MAX_GRAPH_SHAPES)
    pays = saved > shapes * capture
    return pays, (f"pass graphs {'pay' if pays else 'do not pay'} for their capture in this run: about {saved:.0f} s "
                  f"of step time saved over {n_steps} steps against about {shapes * capture:.0f} s to record {shapes} "
                  f"pass width{'s' if shapes != 1 else ''} (speedtune.training.costs.graphs_pay)"
                  + ("" if pays else "; the passes run eagerly (--step-graphs records them anyway)"))


def default_graphs(s: dict, steps: list[list[int]], n_steps: int, tflops: float, packed: bool,
                   lengths: list[int], rows: int) -> tuple[bool, int | None, str, int]:
    """(use the pass graphs, their width multiple or None, why, the shapes they record at most: packed, a shape per
    width; padded, a pass's rows vary too, so fit.MAX_GRAPH_SHAPES) for the default graphs. An eager step is one padded
    pass: the host's EAGER_HOST_S_PER_LAYER a layer or the GPU's work, whichever is longer; a recorded one is the
    GPU's work alone (packed: with its masked attention, priced by fit.packed_over_padded); recording a width costs
    CAPTURE_PASSES eager passes. Packed rows are rounded to the multiple that costs the least over the run
    (packed_width), padded ones to fit.width_multiple."""
    tok_s, host = s_per_token(s, tflops), EAGER_HOST_S_PER_LAYER * s["layers"]
    padded = [len(step) * max(step) * tok_s for step in steps]
    eager = [max(host, p) for p in padded]
    capture = CAPTURE_PASSES * sum(eager) / len(eager)
    if packed:
        base = fit.packed_multiple(lengths, rows)
        # seconds a computed packed token, its attention included: the estimate's packed time over its tokens
        per_token = fit.packed_over_padded(s, lengths, rows) * sum(padded) / sum(
            layout.round_up(sum(step), base) * tok_s for step in steps) * tok_s
        multiple = packed_width(steps, n_steps, per_token, capture, base)
        widths = [layout.round_up(sum(step), multiple) for step in steps]
        recorded = [w * per_token for w in widths]
    else:
        multiple = fit.width_multiple(max(lengths))
        widths = [layout.round_up(max(step), multiple) for step in steps]
        recorded = [len(step) * w * tok_s for step, w in zip(steps, widths)]
    pays, why = graphs_pay(steps, n_steps, eager, recorded, widths, capture)
    shapes = min(len(set(widths)), fit.MAX_GRAPH_SHAPES) if packed else fit.MAX_GRAPH_SHAPES
    return pays, multiple if pays else None, why, shapes


def compile_pays(s: dict, steps: list[list[int]], n_steps: int, tflops: float) -> tuple[bool, str]:
    """Whether Unsloth's per-block compile pays for itself within the run: COMPILE_GAIN of the steps' GPU time (their
    real tokens at the measured matmul rate) over `n_steps`, against COMPILE_S."""
    per_step = sum(map(sum, steps)) / len(steps) * s_per_token(s, tflops)
    saved = COMPILE_GAIN * per_step * n_steps
    pays = saved > COMPILE_S
    return pays, (f"Unsloth's per-block compile (torch.compile) {'pays' if pays else 'does not pay'} for itself in this "
                  f"run: its fused kernels save about {saved:.0f} s of GPU time over {n_steps} steps against about "
                  f"{COMPILE_S:.0f} s to compile (speedtune.training.costs.compile_pays)"
                  + ("" if pays else "; the blocks run uncompiled (UNSLOTH_BLOCK_COMPILE=1 compiles them anyway)"))


def steps_of_run(cfg, n_rows: int, rows_per_step: int) -> int:
    """The optimizer steps the run will take: --max-steps, or its epochs over the rows."""
    if cfg.max_steps and not cfg.epochs:
        return cfg.max_steps
    return math.ceil(n_rows / max(rows_per_step, 1)) * (cfg.epochs or 1)


def block_compile(name: str, block_graphs: bool, eager_packed: bool, model_path: str,
                  steps: list[list[int]], n_steps: int, tflops: float | None) -> tuple[bool, str | None]:
    """(Unsloth compiles its blocks, why). Its per-block CUDA graphs (`--cuda-graphs`) are made by the compile;
    UNSLOTH_BLOCK_COMPILE set in the environment holds; eager packed rows run the blocks uncompiled anyway, and
    without a measured matmul rate Unsloth's own default (on) stands; otherwise compile_pays decides."""
    if name != "unsloth":
        return False, None
    if block_graphs:
        return True, None
    env = backends.user_env("UNSLOTH_BLOCK_COMPILE")
    if env is not None:
        on = env != "0"
        return on, f"Unsloth's per-block compile {'on' if on else 'off'}: UNSLOTH_BLOCK_COMPILE={env} in the environment"
    if eager_packed or not steps or not tflops:
        return True, None
    return compile_pays(fit.shape(model_path), steps, n_steps, tflops)
