"""The GGUF part of `speedtune export`: convert once, quantise to the K-quants, verify every file against the merged
model (next-token agreement and KL on held-out text, greedy answers compared in `speedtune.exporting.behaviour`, one
chat answer in the file's own template), and keep llama.cpp's own chatter (the converter's and quantiser's per-tensor
lines) in `quantize.log` inside the export instead of the user's terminal. `--gguf auto` tries the types from the
smallest up and keeps the first that passes."""

from __future__ import annotations

from pathlib import Path

from speedtune.exporting import behaviour as eb
from speedtune.exporting import gguf_tools as gt

QUALITY_FLOOR = 0.90  # top-1 agreement under this: a loud warning
PROMPT_CHECK = "What is the capital of France? Answer in one word."  # a short answer: it must end on EOS
LOG_NAME = "quantize.log"
AUTO_LADDER = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")  # smallest first; f16 is kept even if it fails
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


def write_gguf(progress, model, tokenizer, merged_dir: Path, work: Path, name: str, quants: list[str], source: Path,
               is_run: bool) -> tuple[list[dict], list[dict]]:
    """Every asked quant as `work/NAME-QUANT.gguf` with its verification entry; with `["auto"]`, the smallest of
    AUTO_LADDER that passes. Returns (the entries of the files written, the entries of the types auto rejected)."""
    auto = quants == ["auto"]
    ladder = list(AUTO_LADDER) if auto else quants
    task = progress.add_task("convert", total=2 * len(ladder) + 2)
    progress.update(task, description="the merged model answers the check prompts (transformers, greedy)")
    merged = eb.prepare(model, tokenizer, source, is_run)
    progress.advance(task)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is a GGUF file?"},
                                            {"role": "assistant", "content": "A GGUF file holds a model's weights and "
                                             "tokenizer in one file that llama.cpp can load."}], tokenize=False)] + HELD_OUT
    maker = _Maker(progress, task, merged_dir, work, name, need_f16=any(q not in gt.CONVERTER_TYPES for q in ladder))
    kept, rejected = [], []
    for q in ladder:
        path = maker.make(q)
        progress.update(task, description=f"verifying {path.name}")
        entry = verify(model, tokenizer, path, q, texts, merged, quick=auto)
        progress.advance(task)
        if not auto or entry["quality_ok"] or q == ladder[-1]:
            kept.append(entry)
            if auto:
                break
        else:
            path.unlink()
            rejected.append(entry)
    maker.done()
    progress.update(task, completed=2 * len(ladder) + 2)
    return kept, rejected


class _Maker:
    """Writes one type at a time: f16/bf16/q8_0 with the converter, the rest quantised from one f16 conversion. When
    a K-quant needs that conversion anyway, q8_0 is quantised from it too: one converter run (minutes on an 8B
    model, seconds of imports on a small one) instead of two."""

    def __init__(self, progress, task, merged_dir: Path, work: Path, name: str, need_f16: bool):
        self.progress, self.task, self.merged_dir, self.work, self.name = progress, task, merged_dir, work, name
        self.log, self.f16, self.need_f16 = work / LOG_NAME, None, need_f16

    def make(self, q: str) -> Path:
        out = self.work / f"{self.name}-{q}.gguf"
        if q == "f16" and self.f16 is not None:  # the conversion made for the K-quants is this file
            self.f16 = self.f16.replace(out)
            return self.f16
        if q in gt.CONVERTER_TYPES and not (q == "q8_0" and self.need_f16):
            self.progress.update(self.task, description=f"converting to GGUF {q} (llama.cpp converter)")
            path = gt.convert(self.merged_dir, out, q, log=self.log)
        else:
            if self.f16 is None:
                self.progress.update(self.task, description="converting to GGUF f16 (intermediate)")
                self.f16 = gt.convert(self.merged_dir, self.work / f".{self.name}-f16-intermediate.gguf", "f16",
                                      log=self.log)
            self.progress.update(self.task, description=f"quantising to {q} (llama.cpp; its log: {LOG_NAME})")
            path = gt.quantize(self.f16, out, q, log=self.log)
        self.progress.advance(self.task)
        if q == "f16":
            self.f16 = path
        return path

    def done(self) -> None:
        if self.f16 is not None and self.f16.name.startswith("."):
            self.f16.unlink()


def verify(model, tokenizer, path: Path, quant: str, texts: list[str], merged, quick: bool = False) -> dict:
    """Metadata, agreement with the merged model on every position of `texts`, a chat answer that must stop, and the
    greedy answers against the merged model's (skipped when `quick` and the agreement already failed)."""
    entry = {"quant": quant, "name": path.name, "size_bytes": path.stat().st_size, "metadata": gt.metadata(path)}
    entry["metadata"].pop("chat_template", None)
    entry.update(gt.logit_agreement(model, tokenizer, path, texts))
    entry["chat"] = gt.chat_check(path, PROMPT_CHECK, max_tokens=128)
    lossy = entry["top1_agreement"] < QUALITY_FLOOR
    entry["behaviour"] = None if lossy and quick else eb.check(path, tokenizer, merged)
    entry["drifted"] = eb.drifted(entry["behaviour"]) if entry["behaviour"] else []
    entry["quality_ok"] = not lossy and not entry["drifted"]
    entry["verdict"] = (f"too lossy: top-1 agreement {entry['top1_agreement']:.1%}, under {QUALITY_FLOOR:.0%}"
                        if lossy else f"drifts: runs on where the merged model ends, on {len(entry['drifted'])} of "
                        f"{entry['behaviour']['merged_stops']} prompts" if entry["drifted"] else "ok")
    return entry


def warnings(report: dict) -> list[str]:
    """One line per GGUF that failed, and what --gguf auto rejected (plain text: the terminal, the page, the
    quickstart)."""
    lines = []
    for g in report["gguf"]:
        if g["quality_ok"]:
            continue
        lines.append(f"WARNING: {g['name']} {g['verdict']}: " + ("; ".join(
            f"asked {d['prompt'][-60:]!r}, the merged model ends after {d['merged_tokens']} tokens, this GGUF "
            f"runs past {d['gguf_tokens']}: {d['gguf'][:80]!r}" for d in g["drifted"][:2]) if g["drifted"] else
            "this type is too lossy for this model") + "; use a larger type (q8_0 or f16), or --gguf auto")
    if report.get("ollama_tools"):
        lines.append(f"WARNING: {report['ollama_tools']}")
    if report.get("auto"):
        tried = "; ".join(f"{r['quant']} {r['verdict']}" for r in report["auto"]["rejected"])
        lines.append(f"--gguf auto kept {report['auto']['picked']}" + (f" (rejected: {tried})" if tried else ""))
    return lines


def report_table(report: dict):
    """The verification table: readable in an 80-column terminal (the answer column folds, never vanishes)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="GGUF verification (against the merged model)", caption=f"KL: mean KL(merged || GGUF); same: "
              f"greedy answers equal to the merged model's; ends: answers that end where its answers end (at most "
              f"{eb.MAX_NEW_TOKENS} tokens); answer: to '{PROMPT_CHECK}', greedy, in llama.cpp with the file's template")
    t.add_column("file", overflow="fold", max_width=24)
    for col in ("size", "top-1", "KL", "same", "ends"):
        t.add_column(col, no_wrap=True)
    t.add_column("answer", overflow="fold", min_width=12, ratio=1)
    for g in report["gguf"]:
        ok = "[green]" if g["quality_ok"] else "[bold red]"
        b = g.get("behaviour")
        same = f"{b['matches']}/{b['prompts']}" if b else "-"
        stops = f"{'[bold red]' if g['drifted'] else ''}{b['merged_stops'] - len(g['drifted'])}/{b['merged_stops']}" \
            if b else "-"
        answer = escape(g["chat"]["answer"][:80]) + ("" if g["chat"]["stops_on_eos"] else " [red](no EOS)")
        t.add_row(g["name"], gt.human_size(g["size_bytes"]), f"{ok}{g['top1_agreement']:.1%}", f"{g['mean_kl']:.4f}",
                  same, stops, answer)
    return t


def print_report(report: dict, console) -> None:
    """The table, the warnings and where things are, on the terminal (or the page's log)."""
    if report["gguf"]:
        console.print(report_table(report))
        for line in warnings(report):  # answers are model text: no markup
            console.print(line, markup=False, style="bold red" if line.startswith("WARNING") else None)
    if report.get("log"):
        console.print(f"llama.cpp's converter and quantiser log: {report['log']}", soft_wrap=True)  # paths unfolded
    if report.get("ollama_create"):
        console.print(f"Ollama: {report['ollama_create']}", soft_wrap=True)
    console.print(f"[green]exported[/] to {report['output']}", soft_wrap=True)
