"""The rows a `speedtune bench` suite trains on, prepared once before any run is spawned (`prepare`): the suite's data
file (any format `speedtune train` reads) or rows made from a length profile, read and tokenised by speedtune's own
data path (speedtune.data), so a bad or over-long row is train's one-line error, said once. The tokenised rows
(input ids and labels, in the file's order) are what the baselines run by their own libraries train on
(speedtune.benchmarking.baselines): the same tokens and the same trained positions as the `speedtune train` runs.

Benchmark data where no real dataset can travel: Alpaca-style rows whose rendered token lengths follow a length
profile (one integer per line; `alpaca` is speedtune/demo/alpaca-lengths.txt, the token counts of 999 real
Alpaca-style rows rendered with SmolLM2's chat template: mean 201, median 161, p90 405, max 743), or all equal to
the sequence length (the dense suite).

Rows are made of real one-token words of the tokenizer's vocabulary, so the text re-tokenises to the same count;
the instruction takes 30% of a row's words, the answer the rest (answers are what is trained, as in real data).
The same profile, seed and tokenizer give the same rows in the same order."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from speedtune.data.dataset import DataOptions, build
from speedtune.errors import UserError


PROFILES = {"alpaca": "alpaca-lengths.txt"}


def profile_path(name: str) -> str:
    if name in PROFILES:
        from speedtune.paths import demo_dir

        return str(demo_dir() / PROFILES[name])
    return name


def read_profile(path: str) -> list[int]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"length profile not found: {path}")
    try:
        lengths = [int(x) for x in p.read_text().split()]
    except ValueError:
        raise UserError(f"{path}: a length profile holds one integer (a row's token count) per line") from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"{path}: a length profile needs at least one positive length")
    return lengths


def _words(tokenizer) -> list[str]:
    """Lower-case alphabetic vocabulary entries that are one token with their leading space."""
    out = []
    for piece in sorted(tokenizer.get_vocab()):
        text = tokenizer.convert_tokens_to_string([piece])
        word = text[1:]
        if text.startswith(" ") and word.isalpha() and word.islower() and len(word) > 3:
            out.append(text)
    return out


def rows(tokenizer, lengths: list[int], count: int, seed: int = 1234, shuffle: bool = True) -> list[dict]:
    """`count` Alpaca rows whose rendered lengths are drawn (in order, cycling) from `lengths`."""
    rng = random.Random(seed)
    words = _words(tokenizer)
    if not words:
        raise UserError("the tokenizer has no plain one-token words to build benchmark rows from")
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    overhead = len(tokenizer(rendered, add_special_tokens=False).input_ids) - 2  # less the two one-token words
    order = list(lengths)
    if shuffle:
        rng.shuffle(order)
    out = []
    for k in range(count):
        n = max(4, order[k % len(order)] - overhead)
        ask = max(1, int(n * 0.3))
        text = lambda m: "".join(rng.choice(words) for _ in range(m)).strip()  # noqa: E731
        out.append({"instruction": text(ask), "input": "", "output": text(n - ask)})
    return out


def write(path: Path, data: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in data))
    tmp.replace(path)
    return path


@dataclass
class Prepared:
    train: Path  # the data file the `speedtune train` runs read
    examples: Path  # its rows tokenised (input_ids, labels per line): what the baselines train on
    eval_examples: Path | None  # the held-out rows, tokenised, when the suite has eval_data
    rows: int
    tokens: int
    sum_sq_lengths: int  # for attention FLOPs (MFU)


def tokenised(suite, tokenizer, data: str):
    """The rows of `data` as `speedtune train` builds them (one-line errors for bad rows, as train gives)."""
    return build(DataOptions(data, suite.format, suite.columns, suite.template, drop_bad=suite.drop_bad), tokenizer,
                 suite.seq_len).examples


def write_examples(path: Path, examples) -> Path:
    if examples and hasattr(examples[0], "chosen_ids"):  # preference pairs (speedtune.data.pairs)
        return write(path, [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids}
                            for e in examples])
    return write(path, [{"input_ids": e.input_ids, "labels": e.labels} for e in examples])


def sequence_lengths(examples) -> list[int]:
    """The token count of every sequence a step runs: a row's, or both of a pair's (prompt + chosen, prompt +
    rejected)."""
    if examples and hasattr(examples[0], "chosen_ids"):
        return [len(e.prompt_ids) + len(a) for e in examples for a in (e.chosen_ids, e.rejected_ids)]
    return [len(e.input_ids) for e in examples]


def read_examples(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def prepare(suite, tokenizer_path: Path, work: Path) -> Prepared:
    """The suite's training rows (and held-out rows), checked and tokenised before any run starts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if suite.data:
        train = Path(suite.data)
    else:
        if suite.lengths == "dense":
            lengths = [suite.seq_len - 8]
        else:
            lengths = [min(n, suite.seq_len - 8) for n in read_profile(profile_path(suite.lengths))]
        train = write(work / f"rows-{suite.lengths.replace('/', '_')}-{suite.seq_len}.jsonl",
                      rows(tok, lengths, suite.rows))
    examples = tokenised(suite, tok, str(train))
    held = None
    if suite.eval_data:
        held = write_examples(work / "examples-eval.jsonl", tokenised(suite, tok, suite.eval_data))
    lengths = sequence_lengths(examples)
    return Prepared(train, write_examples(work / "examples-train.jsonl", examples), held, len(examples),
                    sum(lengths), sum(n * n for n in lengths))
