"""The trainer speedtune runs: TRL's SFTTrainer, given whole optimizer steps (the recipe's rows per step as one batch,
accumulation 1 from the Trainer's point of view) and laying each step out itself (speedtune.training.layout): the rows
are grouped into micro-batches, each trimmed to its own longest row, each with its forward and backward pass, and the
loss is normalised over the step's trained tokens, so the update is the one gradient accumulation computes. Rows are
padded on the right: under the causal mask a real token only sees earlier positions, never the padding after it, and
padding carries no label, so a planned layout (`plan.causal_only`) passes no padding mask at all and attention takes its
flash kernel; the losses and gradients are those of the masked batch. Padding-free (`plan.padding_free`): each
micro-batch's rows run as one sequence with no padding at all (`pack`). With `plan.label_logits` the output layer runs
only where a label is trained (`label_loss`). With `plan.step_graphs` each pass is a replayed CUDA graph
(speedtune.training.graphs) whose gradients go into fixed buffers (the `.grad`). The Trainer keeps what it is good at:
the optimizer and schedule, mixed precision, checkpoints and resume, evaluation, logging. Data parallel
(speedtune.training.distributed): each rank gets its share of a step's rows and lays them out the same way; the step's
trained-token count is summed across ranks (one small all-reduce), each rank's loss is scaled by the number of ranks
(DistributedDataParallel averages gradients), and gradients are all-reduced once a step, on the last micro-batch's
backward. Imported after the backend has loaded the model (Unsloth patches TRL on import)."""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from speedtune.training import distributed, layout
from speedtune.training.callbacks import Listeners
from speedtune.training.runlog import CountedLog
from speedtune.data.encode import IGNORE
from speedtune.training.loss import linear_cross_entropy


class StepCollator:
    """A step's rows -> one right-padded batch, with the rows' lengths and the step's trained-token count (counted
    here, on the CPU, so the training step needs no device sync for them)."""

    def __init__(self, pad_id: int, multiple: int | None = None):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, rows: list[dict]) -> dict:
        lengths = [len(r["input_ids"]) for r in rows]
        width = layout.round_up(max(lengths), self.multiple)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = lengths[i]
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": lengths,
                "n_items": int((labels[:, 1:] != IGNORE).sum())}


def pack(inputs: dict, lengths: list[int], group: list[int], unsloth: bool, width: int | None = None,
         pad_id: int = 0) -> dict:
    """A micro-batch of the group's rows as one sequence of their real tokens, no padding. Positions restart at each
    row, so attention keeps each row to itself (transformers builds a block-diagonal mask from the positions; Unsloth
    also gets the rows' lengths, `packed_seq_lengths`, in CPU memory as its own collator makes them, for its
    variable-length attention: xformers' block-diagonal causal kernel, or torch's varlen one on sm80+). Each row's first
    label is dropped: a row's first token is never predicted in a padded batch either, and here it would be predicted
    from the previous row's last token. So the loss and its token count are the padded batch's. With `width` (a recorded
    pass, speedtune.training.graphs): a tail of padding (no labels) up to that width, and each token's row number,
    `segments` (the tail a row of its own), from which the pass builds its mask."""
    dev = inputs["input_ids"].device
    sizes = [lengths[i] for i in group]
    stride = inputs["input_ids"].shape[1]
    flat = torch.cat([torch.arange(n) + i * stride for i, n in zip(group, sizes)]).to(dev)
    starts = torch.tensor([0] + list(itertools.accumulate(sizes))[:-1]).to(dev)
    labels = inputs["labels"].reshape(-1).index_select(0, flat)
    labels[starts] = IGNORE
    ids = inputs["input_ids"].reshape(-1).index_select(0, flat)
    tail = 0 if width is None else width - sum(sizes)
    if tail:
        ids = torch.cat([ids, ids.new_full((tail,), pad_id)])
        labels = torch.cat([labels, labels.new_full((tail,), IGNORE)])
    spans = sizes + ([tail] if tail else [])
    micro = {"input_ids": ids[None], "labels": labels[None],
             "position_ids": torch.cat([torch.arange(n) for n in spans]).to(dev)[None]}
    if width is not None:
        micro["segments"] = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(spans)).to(dev)[None]
    elif unsloth:  # kept in CPU memory: Unsloth copies it over without waiting (on the GPU, reading it would sync)
        micro["packed_seq_lengths"] = torch.tensor(sizes, dtype=torch.int32)
    return micro


def label_loss(model, micro: dict, n_items: int):
    """The causal-LM loss with the output layer applied only where a label is trained: the decoder's hidden states
    at the positions whose next token has a label, through the output layer, then cross-entropy summed and divided
    by the step's label count, as transformers' loss does (logits in fp32, a chunk at a time: training.loss).
    Prompt and padding positions never reach the vocabulary-wide layer: on the quickstart's rows that is 64% of them.
    The same numbers as the full forward, to float rounding (tests/test_train.py)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in micro.items() if k != "labels"}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    target = micro["labels"][:, 1:]
    keep = target != IGNORE
    count = torch.tensor(float(max(n_items, 1)), device=hidden.device)
    return linear_cross_entropy(hidden[:, :-1][keep], base.get_output_embeddings().weight, target[keep], count)


def attach_loss_scaler(model, scaler) -> None:
    """fp16: Unsloth's fused cross-entropy computes the gradient of the loss times the loss scaler's factor inside
    its forward, reading the scaler from the model (`accelerator_scaler`, which Unsloth's own trainer sets in its
    compute_loss; this trainer calls the model itself). Without it that gradient is taken unscaled in fp16, where
    its small values underflow. Set on the model and every model it wraps (`base_model`, `model`)."""
    todo, seen = [model], set()
    while todo:
        current = todo.pop()
        if not isinstance(current, torch.nn.Module) or id(current) in seen:
            continue
        seen.add(id(current))
        current.accelerator_scaler = scaler
        todo += [getattr(current, a, None) for a in ("base_model", "model")]


class StepTrainer(CountedLog, SFTTrainer):
    """SFTTrainer whose training step runs one optimizer step's rows as planned micro-batches."""

    def __init__(self, *args, plan=None, events=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.events = events  # speedtune.training.events.Events: what ran otherwise than planned
        self.real_tokens = 0  # non-padding tokens trained on
        self.padded_tokens = 0  # tokens computed, padding included
        self.passes = 0
        self.sum_sq_lengths = 0  # for attention FLOPs (benchmarks' MFU)
        self._graphs = None  # speedtune.training.graphs.PassGraphs, with plan.step_graphs
        self._graphs_failed_noted = False
        self.world = distributed.world()
        self.half_lora = None  # speedtune.training.halflora.HalfLoRA while `run` trains, with plan.half_lora

    def groups(self, lengths: list[int]) -> list[list[int]]:
        if self.plan.layout == "tokens":
            return layout.by_tokens(lengths, self.plan.token_budget,
                                    self.plan.pass_overhead_tokens or layout.PASS_OVERHEAD_TOKENS,
                                    self.plan.padding_free)
        return layout.by_rows(lengths, self.plan.micro_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        lengths, n_items = inputs.pop("lengths"), inputs.pop("n_items")
        inputs = self._prepare_inputs(inputs)
        total = None
        groups = self.groups(lengths)
        multiple = self.plan.pad_multiple
        padded = layout.padded_tokens(lengths, groups, multiple, self.plan.padding_free)
        counts = [n_items, sum(lengths), padded, sum(n * n for n in lengths)]  # the whole step's, across ranks
        n_items, real, padded, sum_sq = distributed.sum_across(counts, self.world, inputs["input_ids"].device)
        scale = self.world.size  # DDP averages the ranks' gradients; the loss is over the whole step's tokens
        graphs = self.pass_graphs(model)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16's loss scaler
        if graphs is not None:
            if scaler is not None:
                scaler.scale(torch.zeros((), device=inputs["input_ids"].device))  # starts its factor (for unscale_)
            graphs.begin_step(n_items, scaler.get_scale() if scaler is not None else 1.0)
        elif self.plan.backend == "unsloth" and scaler is not None:
            attach_loss_scaler(model, scaler)  # fp16
        lora = self.half_lora
        if lora is not None:
            lora.refresh()  # the weights the last optimizer step (or a loaded checkpoint) left
        for k, group in enumerate(groups):
            if self.plan.padding_free:  # a recorded pass takes a few widths (a multiple of the pad multiple)
                width = layout.round_up(sum(lengths[i] for i in group), multiple) if graphs is not None else None
                micro = pack(inputs, lengths, group, self.plan.backend == "unsloth", width, self.data_collator.pad_id)
            else:
                width = layout.round_up(max(lengths[i] for i in group), multiple)  # a few widths: a few graph shapes
                rows = torch.tensor(group, device=inputs["input_ids"].device)
                micro = {key: v.index_select(0, rows)[:, :width] for key, v in inputs.items()
                         if key != "attention_mask" or not self.plan.causal_only}
            if graphs is not None:  # one process: no gradient all-reduce
                loss = graphs.run(micro["input_ids"], micro["labels"], micro.get("position_ids"), micro.get("segments"))
                total = loss if total is None else total + loss
                continue
            last = k == len(groups) - 1  # gradients are all-reduced once a step, on the last backward
            sync = contextlib.nullcontext() if last or self.world.size == 1 else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    if self.plan.label_logits:
                        loss = label_loss(model, micro, n_items)
                    elif self.model_accepts_loss_kwargs:
                        loss = model(**micro, num_items_in_batch=max(n_items, 1)).loss
                    else:  # a model that averages per call: weight each micro-batch by its share of the step's tokens
                        mine = int((micro["labels"][:, 1:] != IGNORE).sum())
                        loss = model(**micro).loss * (mine / max(n_items, 1))
                self.accelerator.backward(loss * scale)
                if lora is not None:
                    lora.collect()
            total = loss.detach() if total is None else total + loss.detach()
        if graphs is not None:
            graphs.end_step()
        if lora is not None:
            lora.publish()
        self.padded_tokens += padded
        self.passes += len(groups)  # this rank's
        self.real_tokens += real
        self.sum_sq_lengths += sum_sq
        return total * scale  # the Trainer logs the ranks' mean: the step's loss

    def pass_graphs(self, model):
        """The run's recorded passes (plan.step_graphs), made at the first step; None where passes run eagerly, also
        after a recording failed (the run's events then say why)."""
        if not self.plan.step_graphs:
            return None
        if self._graphs is None:
            from speedtune.training.graphs import PassGraphs

            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            self._graphs = PassGraphs(model, dtype, record=self.args.device.type == "cuda",
                                      float_mask=self.plan.backend == "unsloth")
        if self._graphs.failed:  # from now on the plain passes; the run's events say so
            if not self._graphs_failed_noted:
                self._graphs_failed_noted = True
                self.events.record("step-graphs-failed", self._graphs.failed + ": the passes run eagerly",
                                   step_graphs=False)
            return None
        return self._graphs

    def pass_graphs_summary(self) -> dict | None:
        g = self._graphs
        return None if g is None else {"shapes": sorted(list(k[:2]) for k in g.graphs), "replays": g.replays,
                                       "eager_passes": g.eager_passes, "failed": g.failed,
                                       "packed": self.plan.padding_free, "capture_s": g.capture_s,
                                       "capture_each_s": [round(t, 3) for t in g.capture_each]}

    def _load_optimizer_and_scheduler(self, checkpoint):  # overrides transformers' private method (checked: 5.17)
        """Resuming data-parallel on CPUs: transformers maps the optimizer state to `args.device`, which is "cpu:0"
        there, a location torch.load can't restore; CPU state loads on "cpu"."""
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)

        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu",
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.half_lora is not None:
            self.half_lora.refresh()
        inputs = {k: v for k, v in inputs.items() if k not in ("lengths", "n_items")}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


def build(model, tokenizer, plan, cfg, train_ds, eval_ds, listeners, checkpoints_dir: str, events) -> StepTrainer:
    rows = plan.rows_per_rank  # each data-parallel rank's share of a step (all of it in one process)
    args = SFTConfig(
        output_dir=checkpoints_dir, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_steps=cfg.max_steps if cfg.max_steps and not cfg.epochs else -1,
        num_train_epochs=cfg.epochs or 1, seed=cfg.seed, data_seed=cfg.seed, optim=plan.optim,
        bf16=plan.dtype == "bfloat16", fp16=plan.dtype == "float16", use_cpu=plan.device == "cpu", logging_steps=1,
        save_steps=cfg.save_steps, save_total_limit=2, report_to=cfg.report_to, max_length=cfg.seq_len,
        packing=False, padding_free=False, disable_tqdm=True,
        gradient_checkpointing=False,  # the backend set checkpointing as planned; TRL would turn it on by default
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=cfg.eval_steps,
        per_device_eval_batch_size=plan.micro_batch, dataloader_num_workers=0, dataset_num_proc=None,
        save_only_model=False, log_level="warning", remove_unused_columns=False, ddp_find_unused_parameters=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = StepTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, data_collator=StepCollator(pad, plan.pad_multiple),
                          callbacks=[Listeners(listeners)], plan=plan, events=events)
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss; no dict per step
    return trainer


def run(trainer: StepTrainer, checkpoint: str | None) -> None:
    """trainer.train, resuming from `checkpoint` if given. A checkpoint of the run's last step (a run killed while
    it wrote its final files) is loaded as it is: transformers would train one step past max_steps."""
    if checkpoint:
        import os

        from transformers import TrainerState

        state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        if 0 < trainer.args.max_steps <= state.global_step:
            trainer._load_from_checkpoint(checkpoint)  # transformers' private API, checked against 5.17
            trainer.state = state
            return
    if isinstance(trainer, StepTrainer) and trainer.plan.half_lora:  # not TRL's preference trainers
        from speedtune.training import halflora

        if halflora.lora_linears(trainer.model):  # adapters the backend left in 16 bits need no copies
            trainer.half_lora = halflora.HalfLoRA(trainer.model, torch.float16 if trainer.args.fp16 else torch.bfloat16)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        if getattr(trainer, "half_lora", None) is not None:
            trainer.half_lora.restore()
            trainer.half_lora = None


def checkpointing_on(model) -> bool:
    """Whether the model will recompute activations (what actually runs, whatever was asked)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_gradient_checkpointing", False))
