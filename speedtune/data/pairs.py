"""Preference pairs for `--method dpo|orpo`: rows -> (prompt conversation, chosen answer, rejected answer) -> token
ids. The forms read, as LLaMA-Factory and TRL write them:

- LLaMA-Factory ranking rows: the prompt turns (`conversations`, ShareGPT; or alpaca's `instruction`/`input`) with
  `chosen` and `rejected` answers, each a turn object ({"from": "gpt", "value": ...}) or text; via a
  dataset_info.json entry with `ranking: true` too.
- `prompt`/`chosen`/`rejected` columns: text (the prompt becomes one user turn), or TRL's conversational form
  (`prompt` a list of messages, `chosen`/`rejected` each a list holding one assistant message).
- TRL's implicit-prompt form: `chosen` and `rejected` whole conversations; their shared first turns are the prompt.

Each answer is encoded exactly as SFT would train it (speedtune.data.encode: the model's chat template, the answer
ending with the end-of-turn token once); the prompt is the tokens before it, shared by both answers."""

from __future__ import annotations

from dataclasses import dataclass

from speedtune.data import encode as enc
from speedtune.data import formats, templates
from speedtune.data.encode import Built
from speedtune.data.formats import RowError
from speedtune.data.sources import Record, Source
from speedtune.errors import UserError


@dataclass
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str
    prompt_text: str
    chosen_text: str
    rejected_text: str
    fixed: list[str]

    @property
    def length(self) -> int:
        """The longer of the row's two sequences (prompt + answer)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def n_trained(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PairBuilt(Built):
    """`Built` whose examples are PairExamples; `format` is `preference/<form of the prompt>`."""

    pairs: bool = True

    @property
    def tokens(self) -> int:  # both sequences of every pair
        return sum(2 * len(e.prompt_ids) + e.n_trained for e in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(e.n_trained for e in self.examples)


def is_preference(src: Source, columns: dict[str, str]) -> bool:
    keys = set(src.records[0].data)
    return src.ranking or (columns.get("chosen", "chosen") in keys and columns.get("rejected", "rejected") in keys)


def prompt_form(src: Source, fmt: str | None, columns: dict[str, str]) -> str:
    """How a row gives its prompt: sharegpt, chat (`messages`), alpaca, prompt (a column), or implicit."""
    if fmt in ("sharegpt", "chat", "alpaca"):
        return fmt
    if src.format_hint in ("sharegpt", "alpaca"):
        return src.format_hint
    keys = set(src.records[0].data)
    for form, column in (("sharegpt", "conversations"), ("chat", "messages"), ("alpaca", "instruction"),
                         ("prompt", "prompt")):
        if columns.get(column, column) in keys:
            return form
    return "implicit"


def answer(rec: Record, value, name: str) -> str:
    """A chosen/rejected value -> the answer text: text, a turn object, or a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if formats.ROLE_ALIASES.get(str(role).lower()) != "assistant":
            raise RowError(rec.where, f"'{name}' is a '{role}' turn; it must be the assistant's answer")
        value = value.get("content", value.get("value"))
    if value is None:
        raise RowError(rec.where, f"no '{name}' answer: a preference row needs both chosen and rejected")
    if not isinstance(value, str):
        raise RowError(rec.where, f"'{name}' must be text, a turn object or one assistant message, got "
                                  f"{type(value).__name__}")
    if not value.strip():
        raise RowError(rec.where, f"empty '{name}' answer")
    return value


def to_pair(rec: Record, form: str, columns: dict[str, str], tags: dict[str, str]) -> tuple[list, str, str]:
    """One row -> (prompt messages, chosen text, rejected text), the prompt validated as a conversation that
    ends with a user turn."""
    def get(name):
        return rec.data.get(columns.get(name, name))

    chosen, rejected = get("chosen"), get("rejected")
    if form == "implicit":
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise RowError(rec.where, "no prompt: give a 'prompt' column, or 'chosen' and 'rejected' as whole "
                                      "conversations (lists of messages) that share their first turns")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if not shared:
            raise RowError(rec.where, "'chosen' and 'rejected' share no first turns, so there is no prompt")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        form, rec = "chat", Record(rec.where, {**rec.data, columns.get("messages", "messages"): prompt})
    chosen, rejected = answer(rec, chosen, "chosen"), answer(rec, rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise RowError(rec.where, "chosen and rejected are the same answer: nothing to prefer")
    if form == "prompt":
        prompt = get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not isinstance(prompt, list):
            raise RowError(rec.where, "'prompt' must be text or a list of messages")
        form, rec = "chat", Record(rec.where, {**rec.data, columns.get("messages", "messages"): prompt})
    # the prompt turns with the chosen answer as their last turn: checked as the SFT formats check a conversation
    if form == "alpaca":
        data = {**rec.data, columns.get("output", "output"): chosen}
    else:
        column = columns.get("conversations" if form == "sharegpt" else "messages",
                             "conversations" if form == "sharegpt" else "messages")
        turns = rec.data.get(column)
        if not isinstance(turns, list) or not turns:
            raise RowError(rec.where, f"'{column}' (the prompt) must be a non-empty list of turns")
        tags = tags if form == "sharegpt" else {}
        last = {tags.get("role_tag") or "role": tags.get("assistant_tag") or "assistant",
                tags.get("content_tag") or "content": chosen}
        data = {**rec.data, column: [*turns, last]}
    messages = formats.to_messages(Record(rec.where, data), form, columns, tags or None)
    return messages[:-1], chosen, rejected


def encode_pair(prompt: list[dict], chosen: str, rejected: str, tokenizer, template, seq_len: int,
                where: str) -> PairExample:
    """Both sequences encoded as SFT encodes a conversation; each answer is its sequence's last trained run of
    tokens (the end-of-turn token included) and the prompt the tokens before it, shared by both (where a token
    merges across the boundary, the shared prefix is the prompt)."""
    seqs = []
    for text in (chosen, rejected):
        ex = enc.encode([*prompt, {"role": "assistant", "content": text}], tokenizer, template, seq_len, where)
        start = len(ex.labels)
        while start > 0 and ex.labels[start - 1] != enc.IGNORE:
            start -= 1
        seqs.append((ex, start))
    (c, cs), (r, rs) = seqs
    shared = 0
    while shared < min(cs, rs) and c.input_ids[shared] == r.input_ids[shared]:
        shared += 1
    cut = c.spans[-1][0]
    return PairExample(c.input_ids[:shared], c.input_ids[shared:], r.input_ids[shared:], where, c.text[:cut],
                       c.text[cut:], r.text[r.spans[-1][0]:], c.fixed + r.fixed)


def build_pairs(src: Source, columns: dict[str, str], opts, tokenizer, seq_len: int,
                limit: int | None = None) -> PairBuilt:
    """speedtune.data.dataset.build for preference data (it hands such a source here)."""
    if opts.train_on != "responses":
        raise UserError("--train-on all is for SFT: preference training scores the two answers; leave it out")
    form = prompt_form(src, opts.format, columns)
    template = templates.load(opts.template, tokenizer)
    built = PairBuilt([], len(src.records), f"preference/{form}", template, label=src.label)
    return built.collect(src.records[:limit] if limit else src.records,
                         lambda rec: encode_pair(*to_pair(rec, form, columns, src.tags), tokenizer, template, seq_len,
                                                 rec.where), opts.drop_bad, "pairs")


def views(ex: PairExample) -> list:
    """A pair as the two sequences it trains, each shaped like an SFT example (text, spans, where, input_ids,
    n_trained): the prompt, then the answer as the trained span. What the web page renders."""
    from types import SimpleNamespace

    out = []
    for name, text, ids in (("chosen", ex.chosen_text, ex.chosen_ids), ("rejected", ex.rejected_text,
                                                                       ex.rejected_ids)):
        whole = ex.prompt_text + text
        out.append(SimpleNamespace(text=whole, spans=[(len(ex.prompt_text), len(whole))], where=f"{ex.where} ({name})",
                                   input_ids=ex.prompt_ids + ids, n_trained=len(ids)))
    return out
