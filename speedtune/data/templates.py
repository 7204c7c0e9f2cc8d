"""Chat templates: the model's own (rendered by `tokenizer.apply_chat_template`, so training sees exactly what
inference renders), or a named one from `templates/chat/NAME.yaml` for base models that have none."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from speedtune import paths
from speedtune.errors import UserError

# a probe answer that templates keep as it is: no whitespace at its ends (Llama-3's template trims each message,
# and Python counts control characters such as \x1f as whitespace)
SENTINEL = "SPEEDTUNExPROBE"


@dataclass
class Template:
    name: str
    jinja: str
    eot: str  # the text that ends an assistant turn; generation must stop on it
    stop: list[str] = field(default_factory=list)
    ollama: str | None = None  # the equivalent Go template for an Ollama Modelfile
    default_system: str | None = None

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=self.jinja, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, tools=tools or None)


def names() -> list[str]:
    return sorted(p.stem for p in (paths.templates_dir() / "chat").glob("*.yaml"))


def named(name: str, tokenizer) -> Template:
    path = paths.templates_dir() / "chat" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--template: unknown template '{name}' (known: {', '.join(names())}, or leave it out to "
                        "use the model's own)")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    eos = tokenizer.eos_token or ""
    sub = lambda s: s.replace("{eos}", eos) if isinstance(s, str) else s  # noqa: E731
    t = Template(name, spec["jinja"], sub(spec["eot"]), [sub(s) for s in spec.get("stop", [])], sub(spec.get("ollama")),
                 spec.get("default_system"))
    _check_eot(t, tokenizer)
    return t


def own(tokenizer) -> Template:
    jinja = tokenizer.chat_template
    if not jinja:
        raise UserError(f"the model has no chat template; pick one with --template ({', '.join(names())})")
    t = Template("model", jinja, eot="")
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    rendered = t.render(tokenizer, probe)
    if SENTINEL not in rendered:
        raise UserError("the model's chat template drops or rewrites the assistant's answer, so the end of a turn "
                        f"can't be found; pick one with --template ({', '.join(names())})")
    after = rendered.split(SENTINEL, 1)[1]
    specials = sorted({*tokenizer.all_special_tokens, *(str(x) for x in tokenizer.get_added_vocab())}, key=len,
                      reverse=True)
    t.eot = next((s for s in specials if after.lstrip(" ").startswith(s)), tokenizer.eos_token or "")
    t.stop = [t.eot]
    t.default_system = implied_system(t, tokenizer)
    matched = match_named(t, tokenizer)
    if matched:
        t.ollama, t.stop = matched.ollama, matched.stop
    return t


def load(name: str | None, tokenizer) -> Template:
    return named(name, tokenizer) if name else own(tokenizer)


def implied_system(t: Template, tokenizer) -> str | None:
    """The system prompt a template adds by itself when a conversation has none (SmolLM2's adds one)."""
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    with_sys = t.render(tokenizer, [{"role": "system", "content": SENTINEL}, *convo])
    if SENTINEL not in with_sys:
        return None
    pre, post = with_sys.split(SENTINEL, 1)
    without = t.render(tokenizer, convo)
    if without.startswith(pre) and without.endswith(post) and len(without) > len(pre) + len(post):
        return without[len(pre):len(without) - len(post)]
    return None


def match_named(t: Template, tokenizer) -> Template | None:
    """The named template that renders the same text as `t` (with `t`'s implied system prompt): it carries the Ollama
    TEMPLATE and stop words for export."""
    convos = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    for name in names():  # the very text of a named one first: a run folder's tokenizer carries the one it trained with
        try:
            cand = named(name, tokenizer)
        except UserError:
            continue
        if cand.jinja == t.jinja:
            return cand
    for name in names():
        try:
            cand = named(name, tokenizer)
        except UserError:
            continue
        same = True
        for convo in convos:
            ours = t.render(tokenizer, convo, add_generation_prompt=True)
            sys_convo = convo if convo[0]["role"] == "system" or not t.default_system else \
                [{"role": "system", "content": t.default_system}, *convo]
            if cand.render(tokenizer, sys_convo, add_generation_prompt=True) != ours:
                same = False
                break
        if same:
            return cand
    return None


def _check_eot(t: Template, tokenizer) -> None:
    ids = tokenizer.encode(t.eot, add_special_tokens=False) if t.eot else []
    if len(ids) != 1:
        raise UserError(f"--template {t.name}: it ends turns with '{t.eot}', which is not one token of this model's "
                        "vocabulary, so generation could never stop on it; use the model's own template or alpaca")
