"""The preference baselines of a `speedtune bench` suite with `method: dpo|orpo`, run by their own libraries
(speedtune.benchmarking.baselines hands them here): `trl` is TRL's DPOTrainer / ORPOTrainer over transformers + PEFT;
`unsloth-tutorial` and `unsloth-tuned` are Unsloth's own DPO/ORPO as its notebooks write it (FastLanguageModel, its
LoRA, `PatchDPOTrainer()` before TRL's trainer). The model loading and the recipe are the SFT baselines'.

They train the pairs the `speedtune train` runs train, in the same order: speedtune's data path tokenised them once
(speedtune.benchmarking.rows: prompt, chosen and rejected ids), and TRL's trainer gets those ids with its own tokenising
skipped (the one method it would otherwise run on text: `_prepare_dataset`, ORPO's `tokenize_row`), as the SFT
baselines give SFTTrainer tokenised rows. The same step, the same trainer code as TRL's, TRL's defaults (beta 0.1,
the sigmoid loss; the reference = the adapter switched off). Real tokens are counted on the policy's forwards only
(DPO's reference forward runs without gradients): each pair's two sequences once a step, as speedtune counts them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from speedtune.benchmarking.timing import TokenCount


class PolicyTokenCount(TokenCount):
    """TokenCount on the forwards that take gradients: DPO's reference forward (no_grad) is not a trained token."""

    def _count(self, module, args, kwargs):
        import torch

        if torch.is_grad_enabled():
            super()._count(module, args, kwargs)


class Curve:
    """Each logged step's preference metrics (reward margins and accuracies, ORPO's log-odds)."""

    def __init__(self):
        self.values: dict[str, list] = {}

    def on_log(self, args, state, control, logs=None, **kw):
        from speedtune.training.runlog import RECORDED

        if logs and "loss" in logs:
            for key in RECORDED:
                if key in logs:
                    self.values.setdefault(key, []).append(logs[key])


def measure(spec: dict) -> dict:
    """One baseline run (speedtune.benchmarking.baselines.recipe) with the suite's method."""
    from speedtune.benchmarking import baselines as base
    from speedtune.training import preference

    r = base.recipe(spec["run"]["kind"], spec["suite"], spec["run"], spec["cuda"])

    suite, run, cuda = spec["suite"], spec["run"], spec["cuda"]
    kind, method = run["kind"], suite["method"]
    unsloth = kind.startswith("unsloth")
    if unsloth:
        import unsloth  # noqa: F401 - first: its patches apply to transformers and TRL imported after it
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()
    import torch

    if cuda and suite.get("memory_cap_gb"):
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, suite["memory_cap_gb"] / total))
    from speedtune.benchmarking.rows import read_examples
    from speedtune.benchmarking.timing import listeners_callback, listeners_for, memory_fields, mfu_fields, ordered, \
        timed_fields

    model, tokenizer = base.load_unsloth(r, suite, spec["model_path"]) if unsloth else \
        base.load_peft(r, suite, spec["model_path"], cuda)
    if method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    skip = ("_prepare_dataset", preference.pretokenised_dpo) if method == "dpo" else \
        ("tokenize_row", preference.pretokenised_orpo)
    Trainer = type(Trainer.__name__, (Trainer,), {skip[0]: skip[1]})  # TRL's, its tokenising skipped
    args = base.trainer_arguments(r, suite, spec["output"], cuda, cuda and torch.cuda.is_bf16_supported())
    args.pop("packing", None)
    args.pop("padding_free", None)  # TRL's DPO has no padding-free path (it falls back to padding)
    args = Config(**args, remove_unused_columns=False)
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    timer, profiler, held, end = listeners_for(spec, cuda, dtype)
    counter, curve = PolicyTokenCount(model), Curve()
    pairs = [SimpleNamespace(**e) for e in read_examples(spec["examples_path"])]
    trainer = Trainer(model=model, args=args, train_dataset=preference.dataset(pairs, method),
                      processing_class=tokenizer, callbacks=[listeners_callback([counter, curve,
                                                                                 *ordered(timer, profiler, held)])])
    if "ref" in getattr(model, "peft_config", {}):  # as speedtune.training.preference: the reference is the adapter off
        model.delete_adapter("ref")
        model.set_adapter("default")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    model.save_pretrained(spec["output"])
    adapter = next(Path(spec["output"]).glob("adapter_model.*"))
    result = {"name": run["name"], "kind": kind, "backend": "unsloth" if unsloth else "peft", "method": method,
              "fit": "off", "layout": "rows", "padding_free": False,
              "gradient_checkpointing": base.checkpointing_as_run(model, trainer),
              "micro_batch": args.per_device_train_batch_size, "grad_accum": args.gradient_accumulation_steps,
              "optim": r["optim"], "seed": r["seed"], "dtype": str(dtype or torch.float32).replace("torch.", ""),
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": spec["rows"],
              "time_to_adapter_s": adapter.stat().st_mtime - spec["spawned_at"], "processes": 1,
              "versions": base._versions(kind), **memory_fields(cuda), "preference_curve": curve.values,
              **timed_fields(timer, suite["warmup_steps"], end, profiler, held)}
    result["passes_per_step"] = r["grad_accum"]
    result["real_tokens_per_s_per_process"] = result["real_tokens_per_s"]
    result.update(mfu_fields(spec["model_path"], result["real_tokens_per_s"], spec["tokens"], spec["sum_sq_lengths"],
                             cuda))
    return result


if __name__ == "__main__":  # bench.spawn runs a preference baseline here (as bench_baselines for SFT)
    import sys

    from speedtune.benchmarking.worker import main

    sys.exit(main(sys.argv[1], sys.argv[2], measure))
