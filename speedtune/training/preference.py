"""`--method dpo|orpo`: preference training through TRL's trainers, in the same run as SFT (speedtune.training.train: the
data check, the plan, the run folder, checkpoints and `--resume`, the adapter `speedtune export` takes).

- DPO: TRL's DPOTrainer. The frozen reference is the model itself with the LoRA adapter switched off: TRL does that
  for a PEFT model (no second copy of the weights); TRL adds a copy of the adapter as the reference when the model
  arrives already wrapped, which at the start is the adapter switched off too (LoRA's B starts at zero), so it is
  removed. Each pair's chosen and rejected sequences run as one batch (TRL's collator stacks them). Where the run
  draws more rows than the data has, the reference's log-probs are computed once per pair before training (TRL's
  `precompute_ref_log_probs`) instead of by a reference forward in every step (`precompute`).
- ORPO: TRL's ORPOTrainer (in `trl.experimental` since TRL 1.0): no reference at all.

The rows arrive tokenised (speedtune.data.pairs: the model's template, each answer ending with the end-of-turn
token), so TRL's own tokenising is skipped. Each step is TRL's (micro-batch x accumulation as given): speedtune's
step layout (speedtune.training.layout) is for SFT rows. On a GPU with Unsloth, Unsloth's `PatchDPOTrainer` is applied first,
as its DPO and ORPO notebooks do."""

from __future__ import annotations

import dataclasses

from speedtune.errors import UserError

from speedtune.training.runlog import RECORDED as KEYS  # what each step's log keeps: DPO's rewards, ORPO's log-odds
from speedtune.training.runlog import CountedLog

METHODS = ("dpo", "orpo")


def check(cfg) -> None:
    """The SFT-only layouts, asked for with a preference method: a one-line error naming the flag."""
    for name, flag in (("step_graphs", "--step-graphs"), ("padding_free", "--padding-free"),
                       ("cuda_graphs", "--cuda-graphs")):
        if getattr(cfg, name):
            raise UserError(f"{flag} is for --method sft (speedtune's own step layout); leave it out with "
                            f"--method {cfg.method}")


def plan_config(cfg):
    """The config the plan is resolved from: the recipe as given (`--fit off`), TRL lays out the steps."""
    return dataclasses.replace(cfg, fit="off", step_graphs=False, padding_free=False, cuda_graphs=False)


def plan_note(cfg) -> str:
    trainer = "DPOTrainer, the reference = the model with its adapter off" if cfg.method == "dpo" else \
        "ORPOTrainer (no reference model)"
    return (f"--method {cfg.method}: TRL's {trainer}; each step runs the recipe as given (micro-batch x "
            "accumulation, a pair's chosen and rejected sequences in one batch): speedtune's step layout is for SFT")


def precompute(cfg, plan, pairs: int) -> bool:
    """Whether DPO's reference log-probs are computed once per pair before training: where the run draws more rows
    than there are pairs (more than an epoch), that is fewer reference forwards than one in every step. The numbers
    are the same (the reference is frozen)."""
    return cfg.method == "dpo" and _drawn(cfg, plan, pairs) > pairs


def _drawn(cfg, plan, pairs: int) -> float:
    return cfg.epochs * pairs if cfg.epochs else (cfg.max_steps or 0) * plan.rows_per_step


def reference_note(cfg, plan, pairs: int) -> str:
    """The plan's reason for `precompute`'s choice."""
    if cfg.method != "dpo":
        return "ORPO has no reference model"
    how = "computed once per pair before training" if precompute(cfg, plan, pairs) else \
        "from a reference forward in every step"
    return (f"DPO's reference log-probs (the adapter off) {how}: the run draws {_drawn(cfg, plan, pairs):g} rows "
            f"from {pairs} pairs")


def dataset(examples, method: str):
    """PairExamples -> the trainer's rows: DPO's prompt/chosen/rejected ids, or ORPO's tokenised columns."""
    from datasets import Dataset

    if method == "dpo":
        rows = [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids}
                for e in examples]
    else:
        rows = []
        for e in examples:
            row = {"prompt_input_ids": e.prompt_ids, "prompt_attention_mask": [1] * len(e.prompt_ids)}
            for name, ids in (("chosen", e.chosen_ids), ("rejected", e.rejected_ids)):
                row[f"{name}_input_ids"] = e.prompt_ids + ids
                row[f"{name}_attention_mask"] = [1] * (len(e.prompt_ids) + len(ids))
                row[f"{name}_labels"] = [-100] * len(e.prompt_ids) + ids
            rows.append(row)
    return Dataset.from_list(rows)


def trainer_class(method: str, backend: str):
    """(trainer class, config class). Unsloth's patch first where it trains (imported only there)."""
    if backend == "unsloth":  # GPU only; not testable on a CPU
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return counting(DPOTrainer, pretokenised_dpo), DPOConfig
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError:  # TRL before 1.0
        from trl import ORPOConfig, ORPOTrainer
    return counting(ORPOTrainer, pretokenised_orpo), ORPOConfig


def pretokenised_dpo(self, dataset, processing_class, args, dataset_name):
    """DPOTrainer._prepare_dataset for rows already tokenised (speedtune.data.pairs)."""
    return dataset


def pretokenised_orpo(self, feature, model=None):
    """ORPOTrainer.tokenize_row for rows already tokenised: nothing to add."""
    return {}


def counting(base, prepare):
    """`base` taking speedtune's tokenised rows, counting what its steps compute (metrics.json's real and padded
    tokens, passes) and logging the real-token count the progress and tokens/s read."""
    hook = "_prepare_dataset" if prepare is pretokenised_dpo else "tokenize_row"

    class Trainer(CountedLog, base):
        real_tokens = padded_tokens = passes = sum_sq_lengths = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith("prompt")]
            for mask in masks:
                lengths = mask.sum(dim=1)
                self.real_tokens += int(lengths.sum())
                self.padded_tokens += mask.numel()
                self.sum_sq_lengths += int((lengths * lengths).sum())
            self.passes += 1
            return super().training_step(model, inputs, num_items_in_batch)

        def pass_graphs_summary(self):
            return None  # no recorded passes here (speedtune.training.graphs is SFT's)

    setattr(Trainer, hook, prepare)
    Trainer.__name__ = Trainer.__qualname__ = f"Speedtune{base.__name__}"
    return Trainer


def build(model, tokenizer, plan, cfg, train_ds, eval_ds, listeners, checkpoints_dir: str):
    from transformers.trainer_callback import PrinterCallback

    from speedtune.training.callbacks import Listeners

    trainer_cls, config_cls = trainer_class(cfg.method, plan.backend)
    extra = {"beta": cfg.beta} if cfg.beta is not None else {}  # else TRL's default
    if precompute(cfg, plan, len(train_ds)):
        extra["precompute_ref_log_probs"] = True
    args = config_cls(
        output_dir=checkpoints_dir, per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=max(1, plan.rows_per_rank // plan.micro_batch), learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps if cfg.max_steps and not cfg.epochs else -1, num_train_epochs=cfg.epochs or 1,
        seed=cfg.seed, data_seed=cfg.seed, optim=plan.optim, bf16=plan.dtype == "bfloat16",
        fp16=plan.dtype == "float16", use_cpu=plan.device == "cpu", logging_steps=1, save_steps=cfg.save_steps,
        save_total_limit=2, report_to=cfg.report_to, max_length=cfg.seq_len, disable_tqdm=True,
        gradient_checkpointing=False,  # the backend set it as planned
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=cfg.eval_steps,
        per_device_eval_batch_size=plan.micro_batch, dataloader_num_workers=0, save_only_model=False,
        log_level="warning", remove_unused_columns=False, ddp_find_unused_parameters=False, **extra)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, callbacks=[Listeners(listeners)])
    trainer.remove_callback(PrinterCallback)
    peft_config = getattr(model, "peft_config", {})
    if "ref" in peft_config:  # TRL's copy of the fresh adapter as the reference: the same as the adapter off
        model.delete_adapter("ref")
        model.set_adapter("default")
    return trainer


def summary(steps: list[dict]) -> dict:
    """metrics.json's `preference`: each logged key's first and last value, and the mean of the last few steps."""
    out = {}
    for key in KEYS:
        values = [s[key] for s in steps if s.get(key) is not None]
        if values:
            tail = values[-max(1, len(values) // 4):]
            out[key] = {"first": values[0], "last": values[-1], "last_quarter_mean": sum(tail) / len(tail)}
    return out


def loss_plot(steps: list[dict], evals: list[dict], path, title: str) -> None:
    """loss.png for a preference run: the loss, and the reward margin (DPO) or log-odds ratio (ORPO) beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "rewards/margins" if any("rewards/margins" in s for s in steps) else "log_odds_ratio"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    left.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", color="#1f77b4")
    if evals:
        left.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss",
                  color="#d62728")
    marked = [s for s in steps if s.get(key) is not None]
    right.plot([s["step"] for s in marked], [s[key] for s in marked], color="#2ca02c", label=key)
    for ax, label in ((left, "loss"), (right, key)):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
