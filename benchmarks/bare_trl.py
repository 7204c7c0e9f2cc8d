"""The per-step baseline the real-data issue names: a bare TRL SFTTrainer + PEFT loop, nothing of speedtune's, on a
benchmark's rows (the `rows-*.jsonl` a `speedtune bench` run leaves in its workdir) and model folder. Prints the
seconds per step after warm-up (device-synchronised), so `speedtune train`'s per-step cost can be compared with it
on the same machine in the same call.

    python benchmarks/bare_trl.py MODEL_FOLDER ROWS.jsonl --batch-size 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class Sync(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("rows")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(x) for x in open(a.rows)]
    chats = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
             for r in rows]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map={"": 0})
    args = SFTConfig(output_dir="/tmp/bare-trl", per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                     logging_steps=1, bf16=True, gradient_checkpointing=False, report_to="none", save_strategy="no",
                     learning_rate=2e-4, max_length=2048, disable_tqdm=True, assistant_only_loss=False)
    sync = Sync()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chats), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"), callbacks=[sync])
    trainer.train()
    t = sync.times
    print(json.dumps({"bare_trl_s_per_step": (t[-1] - t[a.warmup - 1]) / (len(t) - a.warmup),
                      "batch_size": a.batch_size, "steps": a.steps}))


if __name__ == "__main__":
    main()
