"""The behaviour check of `speedtune export`: the merged model (transformers) and each GGUF (llama.cpp) answer the same
prompts greedily, from the same prompt tokens and with the same stop tokens, so that a difference comes from the
weights alone (the GGUF's own chat template and EOS are checked apart, by `gguf_tools.chat_check`).

The prompts: a few rows of the run's own data (its `--eval-split` rows when it held some out, else rows it trained on)
and a few generic questions whose answers are short, so that whether an answer ends says something. A GGUF *drifts*
on a prompt when the merged model ends its answer and the GGUF does not end its own within twice as many tokens
(+16): the answer that never stops. Answers that part after a while are counted (`matches`) but not flagged: an
8-bit quant often picks another word where two were nearly tied (on a 2-step SmolLM2-135M run, q8_0 parted from the
merged model on 17 of 26 prompts, at any token from the first to the 63rd, nearly always into an answer as good that
ended too; f16 matched all 26 token for token), so where answers part is no verdict, whether they end is."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from speedtune.data import formats, sources, templates
from speedtune.data.dataset import DataOptions, build, split_eval
from speedtune.data.encode import wants_bos
from speedtune.errors import UserError
from speedtune.inference.llamacpp import open_llama
from speedtune.inference.loader import stop_ids as model_stops
from speedtune.runs import RunFolder

MAX_NEW_TOKENS = 64  # the merged model's budget per prompt: short answers end well within it
DATA_PROMPTS = 3
MAX_PROMPT_TOKENS = 256  # data rows with longer prompts are not picked: the batch stays cheap on a CPU
# short answers that the embedded model ends: the capital question is the one a user found running on in a q8_0, the
# French greeting the one a q8_0 ran on among 11 such questions measured
GENERIC = [
    "What is the capital of France?",
    "Say hello in French.",
    "What is 15 plus 27?",
    "How many days are in a week?",
]


@dataclass
class Prompt:
    source: str  # "generic", "held-out row" or "training row"
    question: str  # the last user turn, as shown in the report
    ids: list[int]


@dataclass
class Answer:
    ids: list[int]
    text: str
    finish: str  # "stop" (ended on a stop token) or "length" (ran to its token limit)


def gguf_limit(ref: Answer) -> int:
    """The GGUF's token budget on a prompt: room to end an answer up to twice as long as the merged model's."""
    return 2 * len(ref.ids) + 16 if ref.finish == "stop" else MAX_NEW_TOKENS


def run_template(path: Path, tokenizer):
    """The chat template the run trained with (its run_config.yaml names it), else the tokenizer's own."""
    name = RunFolder(path).template
    return templates.named(name, tokenizer) if name and name not in ("model", "text") else templates.own(tokenizer)


def prompts(run: Path | None, tokenizer, template) -> tuple[list[Prompt], str]:
    """The prompts, and a note on where the data prompts came from (or why there are none)."""
    bos = [tokenizer.bos_token_id] if wants_bos(tokenizer) else []

    def encode(text: str) -> list[int]:  # as training encodes: BOS once, whether the template writes it or not
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return ids if ids[:1] == bos else bos + ids

    out = []
    for q in GENERIC:
        text = template.render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(Prompt("generic", q, encode(text)))
    rows, source, note = _data_rows(run, tokenizer) if run is not None else \
        ([], "", "a merged folder has no training data")
    picked = []
    for ex, question in rows:  # in a seeded order: the first few whose prompt is short
        start = ex.spans[-1][0]  # where the last answer begins: the prompt is everything before it
        ids = encode(ex.text[:start])
        if len(ids) <= MAX_PROMPT_TOKENS:
            picked.append(Prompt(source, question(ex), ids))
        if len(picked) == DATA_PROMPTS:
            break
    if rows:
        note = f"{len(picked)} {note} (prompts of at most {MAX_PROMPT_TOKENS} tokens)"
    return out + picked, note


def _data_rows(run: Path, tokenizer) -> tuple[list, str, str]:
    """The run's data rows as it trained on them, in a seeded order (its held-out split when there is one), each
    with a function that gives its last question as the user wrote it."""
    folder = RunFolder(run)
    if not folder.config_file.is_file():
        return [], "", "the run folder has no run_config.yaml, so its data is unknown"
    asked = folder.saved().get("asked") or {}
    if not asked.get("data"):
        return [], "", "run_config.yaml names no data"
    split, seed = float(asked.get("eval_split") or 0), int(asked.get("seed") or 3407)
    try:
        built = build(DataOptions(asked["data"], asked.get("format"), asked.get("columns"), asked.get("template"),
                                  "responses", True), tokenizer, int(asked.get("seq_len") or 2048),
                      limit=None if split > 0 else 200)
    except (UserError, OSError, ValueError) as e:
        return [], "", f"the run's data {asked['data']} can't be read here ({str(e).splitlines()[0][:120]})"
    if built.format == "text":
        return [], "", "the run's data is plain text: no questions to ask"
    if split > 0:
        rows, source, note = split_eval(built.examples, split, seed)[1], "held-out row", \
            f"rows the run held out (--eval-split {split:g})"
    else:
        rows, source, note = built.examples, "training row", "training rows (the run held none out: --eval-split would)"
    src = sources.load(asked["data"])
    records = {r.where: r for r in src.records}
    columns = {**src.columns, **formats.parse_columns(asked.get("columns"))}

    def question(ex) -> str:
        try:
            messages = formats.to_messages(records[ex.where], built.format, columns, src.tags)
            return next(m["content"] for m in reversed(messages) if m["role"] == "user")
        except (KeyError, StopIteration, formats.RowError):  # the rendered prompt's end says it too
            return ex.text[: ex.spans[-1][0]].rstrip()[-300:]

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return [(ex, question) for ex in rows], source, note


def stop_ids(folder: Path, model, tokenizer) -> list[int]:
    """The tokens an answer ends on: the exported folder's generation config (a run's adds its template's end of
    turn), the model's and the tokenizer's EOS."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(folder)
    except OSError:
        gen = None
    ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return list(dict.fromkeys(ids + model_stops(model, tokenizer)))


def reference(model, tokenizer, items: list[Prompt], stops: list[int]) -> list[Answer]:
    """The merged model's greedy answers (one batch, left-padded)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p.ids) for p in items)
    ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in items], device=model.device)
    mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in items], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             eos_token_id=stops, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return [_answer(row[width:].tolist(), stops, tokenizer) for row in out]


def gguf_answers(path: Path, tokenizer, items: list[Prompt], refs: list[Answer], stops: list[int]) -> list[Answer]:
    """Each GGUF's greedy answers, from the same prompt tokens, within `gguf_limit` tokens."""
    width = max(len(p.ids) for p in items) + 2 * MAX_NEW_TOKENS + 16
    llm = open_llama(path, n_ctx=max(512, width))
    out = []
    for p, ref in zip(items, refs):
        llm.reset()  # no prefix reuse between prompts: each answer as if alone
        got: list[int] = []
        for tok in llm.generate(p.ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            got.append(tok)
            if tok in stops or len(got) >= gguf_limit(ref):
                break
        out.append(_answer(got, stops, tokenizer))
    llm.close()
    return out


def _answer(ids: list[int], stops: list[int], tokenizer) -> Answer:
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    body = ids if cut is None else ids[:cut]
    return Answer(body, tokenizer.decode(body, skip_special_tokens=True).strip(), "length" if cut is None else "stop")


def compare(items: list[Prompt], refs: list[Answer], got: list[Answer]) -> dict:
    """Per prompt: both answers, where they part, whether the GGUF drifted; and the counts for the table."""
    rows = []
    for p, r, g in zip(items, refs, got):
        same = next((i for i, (a, b) in enumerate(zip(r.ids, g.ids)) if a != b), min(len(r.ids), len(g.ids)))
        rows.append({"source": p.source, "prompt": p.question, "merged": r.text, "gguf": g.text,
                     "merged_finish": r.finish, "gguf_finish": g.finish, "merged_tokens": len(r.ids),
                     "gguf_tokens": len(g.ids), "same_tokens": same,
                     "match": r.ids == g.ids and r.finish == g.finish,
                     "drift": r.finish == "stop" and g.finish == "length"})
    return {"prompts": len(rows), "matches": sum(x["match"] for x in rows),
            "merged_stops": sum(x["merged_finish"] == "stop" for x in rows),
            "gguf_stops": sum(x["gguf_finish"] == "stop" for x in rows),
            "drifted": sum(x["drift"] for x in rows), "max_new_tokens": MAX_NEW_TOKENS, "answers": rows}


@dataclass
class Merged:
    """The merged model's side of the check, computed once per export."""

    items: list[Prompt]
    refs: list[Answer]
    stops: list[int]
    note: str
    seconds: float


def prepare(model, tokenizer, source: Path, is_run: bool) -> Merged:
    """The prompts (a run's data rows when `source` is a run folder) and the merged model's answers."""
    t0 = time.perf_counter()
    items, note = prompts(source if is_run else None, tokenizer, run_template(source, tokenizer))
    stops = stop_ids(source, model, tokenizer)
    refs = reference(model, tokenizer, items, stops)
    return Merged(items, refs, stops, note, time.perf_counter() - t0)


def check(path: Path, tokenizer, merged: Merged) -> dict:
    """One GGUF's answers against the merged model's: counts, every answer pair, and the seconds each side took."""
    t0 = time.perf_counter()
    got = gguf_answers(path, tokenizer, merged.items, merged.refs, merged.stops)
    return {**compare(merged.items, merged.refs, got), "data_prompts": merged.note,
            "seconds": round(time.perf_counter() - t0, 1), "merged_seconds": round(merged.seconds, 1)}


def drifted(result: dict) -> list[dict]:
    """The prompts a GGUF drifted on, each with both answers (what export_report.json lists)."""
    return [{"prompt": a["prompt"], "merged": a["merged"], "gguf": a["gguf"], "merged_tokens": a["merged_tokens"],
             "gguf_tokens": a["gguf_tokens"]} for a in result["answers"] if a["drift"]]
