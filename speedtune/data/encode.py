"""A conversation -> token ids and labels. The text is the template's rendering; the trained part (every assistant
turn, answers and tool calls alike, its end-of-turn token included; never tool results) is found by rendering the
conversation turn by turn, so it is right for any template. Every example ends with the end-of-turn token exactly
once, never with a second BOS."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from speedtune.data.formats import RowError
from speedtune.data.templates import Template
from speedtune.errors import UserError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str
    spans: list[tuple[int, int]]  # trained character spans of `text`
    text: str
    fixed: list[str]

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def wants_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos] and \
        tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]


def encode(messages: list[dict], tokenizer, template: Template, seq_len: int, where: str,
           train_on: str = "responses", tools: list[dict] | None = None) -> Example:
    """One conversation (`encode_many` does many, tokenised in batches)."""
    text, spans, fixed = prepare(messages, tokenizer, template, where, train_on, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return finish(text, spans, fixed, enc["input_ids"], enc["offset_mapping"], tokenizer, seq_len, where,
                  wants_bos(tokenizer))


def encode_many(rows, tokenizer, template: Template, seq_len: int, train_on: str = "responses", batch: int = 512):
    """Yields, row by row in order, `(outcome, messages, tools)` for each `(where, read)` of `rows`: `read()` gives the
    row's messages and tools list (or raises the row's RowError); the outcome is its Example or the RowError it
    raised. The texts are tokenised `batch` at a time in one call of the fast tokenizer (its Rust side spreads a
    batch over the cores), so a bad early row still fails after at most one batch."""
    bos = wants_bos(tokenizer)
    rows = iter(rows)
    while chunk := [r for _, r in zip(range(batch), rows)]:
        ready = []
        for where, read in chunk:
            try:
                messages, tools = read()
                ready.append((where, messages, tools, prepare(messages, tokenizer, template, where, train_on, tools)))
            except RowError as e:
                ready.append((where, None, None, e))
        texts = [p[0] for *_, p in ready if not isinstance(p, RowError)]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
        i = 0
        for where, messages, tools, p in ready:
            if not isinstance(p, RowError):
                try:
                    p = finish(*p, enc["input_ids"][i], enc["offset_mapping"][i], tokenizer, seq_len, where, bos)
                except RowError as e:
                    p = e
                i += 1
            yield p, messages, tools


def prepare(messages: list[dict], tokenizer, template: Template, where: str, train_on: str = "responses",
            tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]], list[str]]:
    """The text to tokenise, its trained character spans (sorted, disjoint) and what was fixed on the way."""
    fixed: list[str] = []
    if messages[0]["role"] == "text":
        text = messages[0]["content"]
        eos = tokenizer.eos_token or ""
        if eos and text.endswith(eos):
            text = text[: -len(eos)]
            fixed.append("removed an EOS already in the text")
        text += eos
        return text, [(0, len(text))], fixed
    messages = _strip_eos(messages, template, tokenizer, fixed)
    text, spans = _render(messages, tokenizer, template, where, tools)
    text = text[: spans[-1][1]]  # nothing after the last end-of-turn token
    return text, [(0, len(text))] if train_on == "all" else spans, fixed


def finish(text: str, spans, fixed, ids, offsets, tokenizer, seq_len: int, where: str, bos: bool) -> Example:
    """The Example from the tokenised text: a BOS first where the model wants one, and each token trained where it
    overlaps a trained span."""
    ids, offsets = list(ids), list(offsets)
    if bos and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    ends = [b for _, b in spans]
    labels = []
    for tid, (s, e) in zip(ids, offsets):
        j = bisect_right(ends, s)  # the first span ending after the token starts; the spans are sorted and disjoint
        labels.append(tid if j < len(spans) and spans[j][0] < e else IGNORE)
    if len(ids) > seq_len:
        raise RowError(where, f"{len(ids)} tokens, longer than --seq-len {seq_len}; raise --seq-len, shorten the "
                              "row, or drop such rows with --drop-bad")
    ex = Example(ids, labels, where, spans, text, fixed)
    if ex.n_trained == 0:
        raise RowError(where, "no token is trained (the answer is empty)")
    return ex


def _strip_eos(messages, template, tokenizer, fixed):
    """Tutorial data often appends EOS to answers by hand; the template adds it, so a second one is removed."""
    enders = {e for e in (template.eot, tokenizer.eos_token) if e}
    out = []
    for m in messages:
        content = m["content"]
        if m["role"] == "assistant":
            for e in enders:
                if content.rstrip().endswith(e):
                    content = content.rstrip()[: -len(e)]
                    fixed.append(f"removed a hand-added {e} from an answer")
        out.append({**m, "content": content})
    return out


def _render(messages, tokenizer, template: Template, where: str, tools: list[dict] | None = None):
    text = template.render(tokenizer, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = template.render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = text if i == len(messages) - 1 else template.render(tokenizer, messages[: i + 1], tools=tools)
        if not text.startswith(prefix) or not upto.startswith(prefix):
            raise RowError(where, f"template '{template.name}' does not render this conversation turn by turn, so the "
                                  "answers can't be located; use --train-on all or another --template")
        start = len(prefix)
        if m.get("tool_calls"):  # the calls as the template writes them, up to and with the end of the turn
            eot_at = upto.find(template.eot, start) if template.eot else -1
            if eot_at < 0 or any(c["function"]["name"] not in upto[start:eot_at] for c in m["tool_calls"]):
                raise RowError(where, f"template '{template.name}' does not write this turn's tool calls before "
                                      f"'{template.eot}'; use another --template")
            spans.append((start, eot_at + len(template.eot)))
            continue
        needle = m["content"].strip()
        found = upto.find(needle, start)
        if found < 0:
            raise RowError(where, f"template '{template.name}' changes the answer text; use another --template")
        end = found + len(needle)
        eot_at = upto.find(template.eot, end) if template.eot else -1
        if eot_at < 0 or upto[end:eot_at].strip():
            raise RowError(where, f"template '{template.name}' does not end the answer with '{template.eot}'; "
                                  "pick a --template that does")
        spans.append((start, eot_at + len(template.eot)))
    return text, spans


@dataclass
class Built:
    examples: list[Example]
    rows: int
    format: str
    template: Template
    dropped: list[tuple[str, str]] = field(default_factory=list)
    fixed: dict[str, int] = field(default_factory=dict)
    label: str = ""
    tool_counts: dict[str, int] = field(default_factory=dict)  # tool-calling data: rows, calls, results, listed

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(e.n_trained for e in self.examples)

    def collect(self, records, encode_row, drop_bad: bool, what: str = "rows") -> "Built":
        """Each record encoded by `encode_row`; a bad row stops the build with its one-line error, or with
        `drop_bad` is dropped and counted. No usable row at all is an error too."""
        def outcomes():
            for rec in records:
                try:
                    yield encode_row(rec)
                except RowError as e:
                    yield e
        return self.gather(outcomes(), drop_bad, what)

    def gather(self, outcomes, drop_bad: bool, what: str = "rows") -> "Built":
        """`collect` for outcomes already made: each an Example or the RowError of its row, in order."""
        for ex in outcomes:
            if isinstance(ex, RowError):
                if not drop_bad:
                    raise ex
                self.dropped.append((ex.where, ex.reason))
                continue
            for f in ex.fixed:
                self.fixed[f] = self.fixed.get(f, 0) + 1
            self.examples.append(ex)
        if not self.examples:
            where, why = self.dropped[0] if self.dropped else ("", "")
            raise UserError(f"{self.label}: no usable {what} ({len(self.dropped)} dropped; first: {where}: {why})",
                            exit_code=1)
        return self
