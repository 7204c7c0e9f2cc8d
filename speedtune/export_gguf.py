"""The GGUF part of `speedtune export`: convert once, quantise to the K-quants, verify every file against the merged
model, and keep llama.cpp's own chatter (the converter's and quantiser's per-tensor lines) in `quantize.log` inside
the export instead of the user's terminal."""

from __future__ import annotations

from pathlib import Path

from speedtune import gguf_tools as gt

QUALITY_FLOOR = 0.90  # top-1 agreement under this: a loud warning
PROMPT_CHECK = "What is the capital of France? Answer in one word."  # a short answer: it must end on EOS
LOG_NAME = "quantize.log"
HELD_OUT = [
    "The water cycle describes how water evaporates from oceans and lakes, condenses into clouds, and falls back to "
    "the ground as rain or snow, where it flows into rivers and returns to the sea. Plants also release water vapour "
    "through their leaves, and some water soaks into the soil and becomes groundwater that can stay underground for "
    "thousands of years before it reaches a spring or a well.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n"
    "        if n % d == 0:\n            return False\n    return True\n",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan, add a chopped onion and cook it "
    "slowly until soft. Stir in two cloves of garlic, then a tin of tomatoes, a pinch of salt and a few basil "
    "leaves. Let it simmer for twenty minutes, stirring now and then, and taste before serving it with pasta.",
    "In 1969 the Apollo 11 mission landed the first people on the Moon. Neil Armstrong and Buzz Aldrin spent about "
    "two and a half hours outside the lunar module, collecting rock samples and setting up experiments, while "
    "Michael Collins orbited above them in the command module.",
]


def write_gguf(progress, model, tokenizer, merged_dir: Path, work: Path, name: str, quants: list[str]) -> list[dict]:
    """Every asked quant as `work/NAME-QUANT.gguf`, each with its verification entry."""
    direct = [q for q in quants if q in gt.CONVERTER_TYPES]
    kquants = [q for q in quants if q not in gt.CONVERTER_TYPES]
    intermediate = 1 if kquants and "f16" not in direct else 0
    task = progress.add_task("convert", total=len(direct) + len(kquants) + len(quants) + intermediate)
    log = work / LOG_NAME
    files: dict[str, Path] = {}
    for q in direct:
        progress.update(task, description=f"converting to GGUF {q} (llama.cpp converter)")
        files[q] = gt.convert(merged_dir, work / f"{name}-{q}.gguf", q, log=log)
        progress.advance(task)
    if kquants:
        src = files.get("f16")
        if src is None:
            progress.update(task, description="converting to GGUF f16 (intermediate)")
            src = gt.convert(merged_dir, work / f".{name}-f16-intermediate.gguf", "f16", log=log)
            progress.advance(task)
        for q in kquants:
            progress.update(task, description=f"quantising to {q} (llama.cpp; its log: {LOG_NAME})")
            files[q] = gt.quantize(src, work / f"{name}-{q}.gguf", q, log=log)
            progress.advance(task)
        if "f16" not in files:
            src.unlink()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is a GGUF file?"},
                                            {"role": "assistant", "content": "A GGUF file holds a model's weights and "
                                             "tokenizer in one file that llama.cpp can load."}], tokenize=False)] + HELD_OUT
    out = []
    for q in quants:
        path = files[q]
        progress.update(task, description=f"verifying {path.name}")
        out.append(verify(model, tokenizer, path, q, texts))
        progress.advance(task)
    return out


def verify(model, tokenizer, path: Path, quant: str, texts: list[str]) -> dict:
    """Metadata, agreement with the merged model on every position of `texts`, and a chat answer that must stop."""
    entry = {"quant": quant, "name": path.name, "size_bytes": path.stat().st_size, "metadata": gt.metadata(path)}
    entry["metadata"].pop("chat_template", None)
    entry.update(gt.logit_agreement(model, tokenizer, path, texts))
    entry["chat"] = gt.chat_check(path, PROMPT_CHECK, max_tokens=128)
    entry["quality_ok"] = entry["top1_agreement"] >= QUALITY_FLOOR
    return entry


def report_table(report: dict):
    """The verification table: readable in an 80-column terminal (the answer column folds, never vanishes)."""
    from rich.table import Table

    t = Table(title="GGUF verification (against the merged model)", caption=f"answer: to '{PROMPT_CHECK}', greedy, "
              "in llama.cpp")
    t.add_column("file", overflow="fold", max_width=24)
    for col in ("size", "top-1", "mean KL", "stops"):
        t.add_column(col, no_wrap=True)
    t.add_column("answer", overflow="fold", min_width=16, ratio=1)
    for g in report["gguf"]:
        ok = "[green]" if g["quality_ok"] else "[bold red]"
        t.add_row(g["name"], gt.human_size(g["size_bytes"]), f"{ok}{g['top1_agreement']:.1%}", f"{g['mean_kl']:.4f}",
                  "yes" if g["chat"]["stops_on_eos"] else "[red]NO", g["chat"]["answer"][:80])
    return t
