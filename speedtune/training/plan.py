"""How a run is set up on the hardware at hand: one frozen object, resolved once (`resolve`, a function of what was
asked (RunConfig), the machine and the data), then used by the run and saved beside the config in `run_config.yaml`
before the model loads. Every choice made for the user is here, with its reason. Nothing changes it afterwards: what
turns out otherwise at run time is an event beside it (speedtune.training.events)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speedtune import hardware
from speedtune.errors import UserError, install_hint
from speedtune.training import backends, costs, fit


@dataclass(frozen=True)
class Plan:
    backend: str
    backend_why: str
    device: str
    device_name: str
    dtype: str
    dtype_why: str
    memory_gb: float | None
    model_path: str
    output: str
    load_in_4bit: bool
    optim: str
    rows_per_step: int  # across all processes
    layout: str  # rows: the recipe's micro-batches; tokens: each step packed by a token budget (training.layout)
    micro_batch: int
    token_budget: int | None
    gradient_checkpointing: bool
    causal_only: bool  # right-padded micro-batches run without a padding mask (see speedtune.training.trainer)
    pass_overhead_tokens: int | None  # the layout's price of one more pass, in padded tokens (speedtune.training.fit)
    offload_embeddings: bool
    loss_chunk_gb: float | None
    cuda_graphs: bool = False  # Unsloth's per-block CUDA graphs (as they load: a `block-graphs` event if otherwise)
    block_compile: bool = False  # Unsloth compiles each transformer block (torch.compile) on its first pass
    step_graphs: bool = False  # whole passes recorded as CUDA graphs (training.graphs)
    pad_multiple: int | None = None  # micro-batch widths rounded up to a multiple of this (a few graph shapes)
    padding_free: bool = False  # each micro-batch's rows run as one sequence, no padding (training.trainer.pack)
    checkpoint_keep_layers: int = 0  # with checkpointing, layers that keep their activations (speedtune.training.costs)
    label_logits: bool = False  # the output layer and the loss run only where a label is trained (trainer.label_loss)
    half_lora: bool = False  # 16-bit copies of the LoRA weights, cast once a step (speedtune.training.halflora)
    processes: int = 1  # data-parallel ranks (torchrun / accelerate launch); each trains rows_per_rank of a step
    fit: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    @property
    def rows_per_rank(self) -> int:
        return self.rows_per_step // self.processes

    def as_dict(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}

    def summary(self) -> str:
        """Two lines to read at a glance: where and how the run trains, and how each step is laid out."""
        dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(self.dtype, self.dtype)
        where = (f"[bold]{self.backend}[/] on {self.device} ({self.device_name}), {dtype}"
                 + (", 4-bit base" if self.load_in_4bit else "") + f", {self.optim}"
                 + (f", {self.processes} processes" if self.processes > 1 else ""))
        if self.layout == "tokens":
            how = f"micro-batches of at most {self.token_budget} tokens"
        else:
            how = f"micro-batch {self.micro_batch} x {self.rows_per_rank // self.micro_batch} passes"
        traits = [("packed (padding-free)" if self.padding_free else ""),
                  ("CUDA graphs per pass" if self.step_graphs else ""),
                  ("CUDA graphs per block" if self.cuda_graphs else ""),
                  "checkpointing " + ("on" if self.gradient_checkpointing else "off"),
                  ("embeddings in CPU memory" if self.offload_embeddings else "")]
        estimate = self.fit.get("estimated_gb")
        if self.device == "cuda" and estimate is not None:
            traits.append(f"memory ~{estimate:.1f}" + (f" of {self.memory_gb:.0f}" if self.memory_gb else "")
                          + " GB (estimated)")
        layout = f"{self.rows_per_step} rows a step: {how}, " + ", ".join(t for t in traits if t)
        return f"plan: {where}\n      {layout}"

    def explain(self) -> str:
        """Why: the choices behind the summary, one a line (`--verbose`; also `plan` in run_config.yaml)."""
        why = [f"backend {self.backend}: {self.backend_why}", f"precision {self.dtype}: {self.dtype_why}",
               *self.reasons]
        return "why:\n" + "\n".join(f"  - {r}" for r in why)


def hardware_for(cfg):
    """The machine, with --precision and --memory-cap-gb applied (a big GPU made to behave like a small one)."""
    hw = hardware.detect(None if cfg.device == "auto" else cfg.device)
    if cfg.device == "cuda" and hw.device != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible here; use --device auto or cpu")
    if cfg.precision != "auto":
        names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        hw = dataclasses.replace(hw, dtype=names[cfg.precision], why=f"--precision {cfg.precision}")
    if cfg.memory_cap_gb and hw.device == "cuda":
        hw = dataclasses.replace(hw, memory_gb=min(hw.memory_gb, cfg.memory_cap_gb))
    return hw


# Model types whose logits are the output layer applied to the decoder's last hidden states, nothing more (no
# soft-capping or logit scale): for these the trainer may apply that layer at the trained positions only.
PLAIN_HEADS = {"llama", "mistral", "qwen2", "qwen3"}


def default_output(model: str) -> Path:
    stem = Path(model.rstrip("/")).name or "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def output_for(cfg) -> str:
    """The run folder: --output, else a new runs/MODEL-TIME."""
    return str(Path(cfg.output).expanduser() if cfg.output else default_output(cfg.model))


def allocator_reason(allocator: str) -> str:
    return f"CUDA allocator: {allocator}" + (
        "; expandable segments grow in place, so less stays reserved beyond what is allocated (not yet "
        "measured here)" if "expandable_segments:True" in allocator else "")


def resolve(cfg, hw, model_path: Path, lengths: list[int], backend: tuple[str, str] | None = None,
            world_size: int = 1, *, output: str | None = None, data: dict | None = None,
            allocator: str | None = None) -> Plan:
    """The plan for `cfg` on `hw`, given the real token lengths of the training rows; `world_size` processes share
    each step's rows (data parallel). `output`: the run folder (default `output_for(cfg)`, which names a new folder
    by the time); `data`: what the data is (format, template, rows, lengths: saved with the plan); `allocator`: the
    CUDA allocator's settings, where they were set."""
    name, why = backend or backends.choose(cfg.backend, hw.device)
    four_bit = cfg.load_in_4bit if cfg.load_in_4bit is not None else hw.device == "cuda"
    if four_bit and hw.device != "cuda":
        raise UserError("--4bit needs a CUDA GPU (bitsandbytes); on a CPU train with --no-4bit")
    rows = cfg.batch_size * cfg.grad_accum
    if rows % world_size:
        raise UserError(f"--batch-size x --grad-accum = {rows} rows a step can't be shared by {world_size} processes; "
                        f"make it a multiple of {world_size}")
    mine = rows // world_size  # each process lays out its share of a step
    mode = cfg.fit
    note = None
    checkpointing = cfg.gradient_checkpointing
    if hw.device == "cuda" and mode in ("auto", "lean") and name != "unsloth":
        mode, note = "off", ("the PEFT backend runs the recipe's micro-batches as given: the fit's layouts are "
                             f"calibrated on Unsloth's kernels ({install_hint('gpu')})")
        if checkpointing is None and cfg.fit == "auto":
            checkpointing, ck_why = fit.peft_checkpointing(str(model_path), min(cfg.batch_size, mine) * (
                max(lengths) if lengths else cfg.seq_len), cfg.lora_r, four_bit, hw.memory_gb)
            note += "; " + ck_why
    graphs = bool(cfg.cuda_graphs)  # only when asked for (speedtune.training.fit)
    if graphs and (name != "unsloth" or hw.device != "cuda"):
        raise UserError("--cuda-graphs needs the Unsloth backend on a CUDA GPU; leave it out (or --no-cuda-graphs)")
    packed = fit.padding_free(mode, cfg.padding_free, hw.device)
    if packed and graphs:
        if cfg.padding_free:
            raise UserError("--padding-free and --cuda-graphs don't go together: Unsloth runs variable-length batches "
                            "through its uncompiled blocks; leave one of them out")
        packed = False  # the graphs asked for need the padded rows' fixed shapes
    # fp16 (no bf16: a T4-class GPU), where pass graphs don't run: the step is GPU work (speedtune.training.costs)
    gpu_bound = (hw.device == "cuda" and hw.dtype == "float16" and name == "unsloth" and mode == "auto"
                 and not graphs and cfg.padding_free is not False and not cfg.step_graphs)
    packed = packed or gpu_bound
    step_graphs = resolve_step_graphs(cfg, hw, world_size, graphs, packed)
    n_steps = costs.steps_of_run(cfg, len(lengths), rows)
    steps = costs.run_steps(lengths, mine, n_steps, cfg.seed)
    tflops = (hardware.matmul_tflops(hw.dtype) if hw.device == "cuda" and mode in ("auto", "lean") and not gpu_bound
              else None)
    packed_why = graphs_why = pad = None
    shapes = fit.MAX_GRAPH_SHAPES  # pass graphs recorded at most (their memory pool grows with them)
    if step_graphs and cfg.padding_free is None and name == "unsloth" and lengths:
        ratio = fit.packed_over_padded(fit.shape(str(model_path)), lengths, mine)
        packed = ratio < 1
        packed_why = (f"{'padding-free' if packed else 'padded'} passes: packing each step's rows into one sequence "
                      f"is estimated at {ratio:.2f} of the padded passes' time on these rows (speedtune.training.fit."
                      "packed_over_padded: it saves the padding, and its masked attention grows with the square "
                      "of the packed width)")
    if step_graphs and cfg.step_graphs is None and steps and tflops:  # the default: where the capture pays
        step_graphs, pad, graphs_why, shapes = costs.default_graphs(fit.shape(str(model_path)), steps, n_steps,
                                                                     tflops, packed, lengths, mine)
        if not step_graphs and packed_why:  # packed only for the graphs: eager passes keep padded rows
            packed, packed_why = False, None
    longest = max(lengths) if lengths else cfg.seq_len
    if gpu_bound:
        f = costs.gpu_bound_fit(str(model_path), steps=steps, rows_per_step=mine, micro_batch=min(cfg.batch_size, mine),
                                longest_row=longest, lora_r=cfg.lora_r, four_bit=four_bit, capacity_gb=hw.memory_gb,
                                checkpointing=checkpointing, offload=cfg.offload_embeddings)
    else:
        f = fit.fit(
            mode, str(model_path), rows_per_step=mine, micro_batch=min(cfg.batch_size, mine), tflops=tflops,
            longest_row=longest, lora_r=cfg.lora_r, four_bit=four_bit,
            capacity_gb=hw.memory_gb if hw.device == "cuda" else None, act_bytes=2 if hw.dtype != "float32" else 4,
            checkpointing=checkpointing, graphs=graphs or step_graphs, packed=packed, graph_shapes=shapes)
    block_compile, compile_why = costs.block_compile(name, graphs, packed and not step_graphs, str(model_path),
                                                     steps, n_steps, tflops)
    if note:
        f.reasons = [note]
    elif name == "unsloth":
        f.reasons.append("Unsloth keeps its fused LoRA kernels and chunked cross-entropy" + (
            "; variable-length batches run its blocks uncompiled (no compile time)" if packed and not step_graphs
            else ""))
    if compile_why:
        f.reasons.append(compile_why)
    offload = cfg.offload_embeddings if cfg.offload_embeddings is not None else f.offload_embeddings
    chunk = cfg.loss_chunk_gb if cfg.loss_chunk_gb is not None else f.loss_chunk_gb
    micro = f.micro_batch if f.layout == "rows" else cfg.batch_size
    if mine % micro:
        micro = math.gcd(cfg.batch_size, mine)
    causal_only = f.layout == "tokens" and not packed
    if packed:
        f.reasons.append("padding-free: each micro-batch's rows run as one sequence of their real tokens, attention "
                         "kept within each row (positions restart at each row), so no work goes to padding")
    elif causal_only:
        f.reasons.append("rows are padded on the right, so the causal mask alone keeps every real token from seeing "
                         "padding: no padding mask, and attention runs its fastest (flash) kernel")
    if gpu_bound and packed:
        f.reasons.append("padding-free by default on a GPU without bf16, where every padded token is GPU time "
                         "(Unsloth's own default there too): Unsloth gets the rows' lengths and keeps each row to "
                         "itself in its variable-length attention, no dense mask (xformers' block-diagonal causal "
                         "kernel below sm80, e.g. a T4; torch's own kernels on newer GPUs)")
    for extra in (packed_why, graphs_why):
        if extra:
            f.reasons.append(extra)
    if step_graphs:
        f.reasons.append("each micro-batch shape's forward and backward pass is recorded once as a CUDA graph and "
                         "replayed (speedtune.training.graphs): the host launches one graph a pass instead of its thousands "
                         "of kernels; " + ("the packed rows padded at the end to a fixed width, their mask built in "
                                           "the graph" if packed else "rows padded on the right, no padding mask")
                         + ", the output layer and the loss in chunks (speedtune.training.loss)")
        if f.gradient_checkpointing and name == "unsloth":
            f.reasons.append("checkpointing recomputes each layer plainly inside the graphs: Unsloth's offloaded "
                             "variant copies to CPU memory, which a graph can't hold")
    # one process only: data-parallel training has to go through DistributedDataParallel's own forward
    label_logits = (name == "peft" and f.mode != "off" and world_size == 1 and not step_graphs
                    and fit.shape(str(model_path))["model_type"] in PLAIN_HEADS)
    if label_logits:
        f.reasons.append("the output layer and the loss run only at the positions that have a label (the trained "
                         "tokens), their logits a chunk at a time: a vocabulary-wide layer over every prompt token "
                         "cost the 135M model a third of its step")
    optim = cfg.optim or ("adamw_8bit" if hw.device == "cuda" else "adamw_torch")
    half_lora = (name == "unsloth" and hw.dtype != "float32" and not step_graphs and world_size == 1
                 and cfg.method == "sft")  # TRL's preference trainers run their own steps
    if half_lora:
        f.reasons.append("the LoRA weights cast to 16 bits once a step, not at each use in Unsloth's kernels (and "
                         "their gradients back once a pass): speedtune.training.halflora")
    # the width multiple of fixed-shape passes (graphs of either kind); the default graphs' is weighed above
    if step_graphs and packed:
        base = fit.packed_multiple(lengths or [cfg.seq_len], mine)
        pad = pad or base
        f.reasons.append(f"a pass's packed rows are padded to a multiple of {pad} tokens: a few widths, so a few "
                         "graph shapes" + (" (about an eighth of a step's tokens)" if pad == base else
                                           f" ({pad // base} x an eighth of a step's tokens: over {n_steps} steps "
                                           "fewer recordings cost less than the padding they add; "
                                           "speedtune.training.costs.packed_width)"))
    elif graphs or step_graphs:
        pad = fit.width_multiple(max(lengths) if lengths else cfg.seq_len)
        f.reasons.append(f"each transformer block replays as CUDA graphs (Unsloth's, one per shape): rows are padded "
                         f"to a multiple of {pad} tokens, so at most {fit.GRAPH_WIDTHS} widths occur and the host "
                         "launches one graph a block instead of its ~200 kernels" if graphs else
                         f"rows are padded to a multiple of {pad} tokens, so at most {fit.GRAPH_WIDTHS} widths (graph "
                         "shapes) occur")
    if cfg.optim is None and hw.device == "cuda" and (f.mode in ("auto", "lean") or step_graphs):
        optim = "adamw_torch_fused"
        f.reasons.append("optimizer AdamW, fused (one kernel for all adapters) instead of 8-bit AdamW's kernel per "
                         "adapter: LoRA's optimizer state is small, so full precision costs little memory and is "
                         "exact")
    return Plan(backend=name, backend_why=why, device=hw.device, device_name=hw.name, dtype=hw.dtype,
                dtype_why=hw.why, memory_gb=hw.memory_gb, model_path=str(model_path),
                output=output if output is not None else output_for(cfg),
                load_in_4bit=bool(four_bit), optim=optim, rows_per_step=rows, layout=f.layout, micro_batch=micro,
                token_budget=f.token_budget, gradient_checkpointing=f.gradient_checkpointing, causal_only=causal_only,
                pass_overhead_tokens=f.pass_overhead_tokens, offload_embeddings=bool(offload), loss_chunk_gb=chunk,
                cuda_graphs=graphs, block_compile=block_compile, step_graphs=step_graphs, pad_multiple=pad,
                padding_free=packed, checkpoint_keep_layers=f.keep_layers, label_logits=label_logits,
                half_lora=half_lora, processes=world_size, fit=f.as_dict(), data=dict(data or {}),
                reasons=tuple(f.reasons) + ((allocator_reason(allocator),) if allocator and hw.device == "cuda"
                                            else ()))


def resolve_step_graphs(cfg, hw, world_size: int, block_graphs: bool, packed: bool) -> bool:
    """Whether whole passes run as CUDA graphs (speedtune.training.graphs). Asked for, it must be possible here, or a
    one-line error names the conflict. By default: on a GPU in one process with `--fit auto`, without fp16 (asked
    for, fp16 runs them with the loss scaler's factor as a graph input; its overflow check reads the host once a
    step). Checkpointing goes with them: recomputing a layer is GPU work (on Unsloth its plain checkpointing then runs
    instead of the offloaded one, whose copies to CPU memory a graph can't hold). Padding-free rows go with them when
    both are asked for (`--padding-free --step-graphs`: the packed rows padded to a few fixed widths,
    speedtune.training.graphs). A padding-free default (`--fit lean`) runs eagerly; under the default graphs,
    `resolve` packs the rows where fit.packed_over_padded says it is faster."""
    asked = cfg.step_graphs
    conflicts = [(hw.device != "cuda", "a CUDA GPU"), (world_size > 1, "one process (not data parallel)"),
                 (block_graphs, "no --cuda-graphs (Unsloth's per-block graphs)")]
    missing = [what for bad, what in conflicts if bad]
    if asked:
        if missing:
            raise UserError(f"--step-graphs needs {missing[0]}")
        return True
    if asked is False or missing or packed or hw.dtype == "float16":
        return False
    return cfg.fit == "auto"
