"""A conversation -> token ids and labels. The text is the template's rendering; the trained part (every assistant
turn, answers and tool calls alike, its end-of-turn token included; never tool results) is found by rendering the
conversation turn by turn, so it is right for any template. Every example ends with the end-of-turn token exactly
once, never with a second BOS."""

from __future__ import annotations

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
    fixed: list[str] = []
    if messages[0]["role"] == "text":
        text = messages[0]["content"]
        eos = tokenizer.eos_token or ""
        if eos and text.endswith(eos):
            text = text[: -len(eos)]
            fixed.append("removed an EOS already in the text")
        text += eos
        spans = [(0, len(text))]
    else:
        messages = _strip_eos(messages, template, tokenizer, fixed)
        text, spans = _render(messages, tokenizer, template, where, tools)
        text = text[: spans[-1][1]]  # nothing after the last end-of-turn token
        if train_on == "all":
            spans = [(0, len(text))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if wants_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    labels = [tid if any(s < b and e > a for a, b in spans) else IGNORE for tid, (s, e) in zip(ids, offsets)]
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
        upto = template.render(tokenizer, messages[: i + 1], tools=tools)
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
        for rec in records:
            try:
                ex = encode_row(rec)
            except RowError as e:
                if not drop_bad:
                    raise
                self.dropped.append((e.where, e.reason))
                continue
            for f in ex.fixed:
                self.fixed[f] = self.fixed.get(f, 0) + 1
            self.examples.append(ex)
        if not self.examples:
            where, why = self.dropped[0] if self.dropped else ("", "")
            raise UserError(f"{self.label}: no usable {what} ({len(self.dropped)} dropped; first: {where}: {why})",
                            exit_code=1)
        return self
