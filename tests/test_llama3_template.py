"""The Llama-3 chat format end to end, with a tokenizer that carries Llama-3's special tokens (the embedded SmolLM2
tokenizer plus <|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|> and <|end_of_text|>, adding BOS
itself as Llama-3's does): Meta's own chat template is recognised as templates/chat/llama-3.yaml; rendering, the
trained tokens and the end of turn are right; generation stops on <|eot_id|> even where the model's generation
config says <|end_of_text|> (Llama-3 base); and the Ollama TEMPLATE, rendered by Go's text/template as Ollama does,
gives the prompt training saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_here

from speedtune.data import templates
from speedtune.data.dataset import DataOptions, build, stop_check
from speedtune.data.encode import IGNORE
from speedtune.exporting.deploy import modelfile

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, as published
META = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]
# the same conversation written out by hand from Meta's prompt-format documentation
CHAT_TEXT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
CONVOS = [CHAT[1:2], CHAT[:4], CHAT]


def llama3_tokenizer(smollm2: Path, chat_template: str | None, eos: str = "<|eot_id|>"):
    """Instruct's tokenizer ends on <|eot_id|>, the base's on <|end_of_text|>."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": eos,
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                          "<|end_of_text|>"]})
    tok._tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def instruct(smollm2, tmp_path_factory):
    """A Llama-3 Instruct tokenizer folder (Meta's chat template), saved and loaded back as a checkpoint's is."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("llama3-instruct")
    llama3_tokenizer(smollm2, META).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def test_the_tokenizer_is_llama3s(instruct):
    ids = instruct("Hi").input_ids
    assert ids[0] == instruct.bos_token_id and ids.count(instruct.bos_token_id) == 1  # BOS added, as Llama-3's does
    for special in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"):
        assert len(instruct.encode(special, add_special_tokens=False)) == 1, special
    assert instruct.apply_chat_template(CHAT, tokenize=False) == CHAT_TEXT


def test_meta_template_is_recognised_as_llama3_and_renders_alike(instruct):
    own, named = templates.own(instruct), templates.named("llama-3", instruct)
    assert own.eot == "<|eot_id|>" and own.default_system is None
    assert own.ollama == named.ollama and "<|eot_id|>" in own.stop  # found by match_named: export gets its TEMPLATE
    for convo in CONVOS:
        for gen in (False, True):
            assert named.render(instruct, convo, gen) == own.render(instruct, convo, gen)
    assert named.render(instruct, CHAT) == CHAT_TEXT


@pytest.mark.parametrize("which", ["own", "named"])
def test_labels_train_every_answer_and_its_eot_once(which, instruct, smollm2, tmp_path):
    # the base model has no template of its own: --template llama-3
    tok = instruct if which == "own" else llama3_tokenizer(smollm2, None, eos="<|end_of_text|>")
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    built = build(DataOptions(str(data), template=None if which == "own" else "llama-3"), tok, 512)
    ex = built.examples[0]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert ex.text == CHAT_TEXT and ex.input_ids == tok(CHAT_TEXT, add_special_tokens=False).input_ids
    assert ex.input_ids.count(tok.bos_token_id) == 1 and ex.input_ids[0] == tok.bos_token_id  # no second BOS
    assert ex.input_ids[-1] == eot and ex.input_ids.count(eot) == 5
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == "Hello.<|eot_id|>4<|eot_id|>"
    # the trained tokens are exactly the answers and their end of turn, the assistant headers are not
    trained_at = [i for i, t in enumerate(ex.labels) if t != IGNORE]
    assert all(ex.labels[i] == ex.input_ids[i] for i in trained_at)
    assert [ex.input_ids[i] for i in trained_at if ex.input_ids[i] == eot] == [eot, eot]


def test_generation_stops_on_eot_where_the_base_stops_on_end_of_text(instruct):
    from transformers import GenerationConfig

    t = templates.named("llama-3", instruct)
    eot, end = (instruct.convert_tokens_to_ids(s) for s in ("<|eot_id|>", "<|end_of_text|>"))
    assert stop_check(t, instruct, GenerationConfig(eos_token_id=[end, eot])) == ([end, eot], None)  # Instruct's
    ids, warning = stop_check(t, instruct, GenerationConfig(eos_token_id=end))  # Llama-3 base's
    assert ids == [end, eot] and "<|eot_id|>" in warning
    mf = modelfile("m.gguf", t)
    assert 'PARAMETER stop "<|eot_id|>"' in mf and "SYSTEM" not in mf


@pytest.mark.slow
def test_ollama_template_through_go_is_the_training_prompt(instruct, go_render):
    t = templates.own(instruct)
    ollama = modelfile("m.gguf", t).split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for convo in CONVOS:
        ours = t.render(instruct, convo, add_generation_prompt=True)
        # BOS is not template text for llama.cpp and Ollama: the GGUF's add_bos_token makes the tokenizer add it
        assert ours.startswith("<|begin_of_text|>")
        assert go_render(ollama, convo) == ours.removeprefix("<|begin_of_text|>")


@pytest.mark.slow
def test_a_run_on_a_llama3_base_stops_on_eot(smollm2, tmp_path):
    """`speedtune train --template llama-3` on a Llama-3-shaped base (no chat template, generation config ending on
    <|end_of_text|>): the run folder carries the template, and chat on it renders the training prompt and stops on
    <|eot_id|>."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from speedtune.inference.loader import HFEngine, stop_ids

    base = tmp_path / "llama3-base"
    tok = llama3_tokenizer(smollm2, None, eos="<|end_of_text|>")
    end, eot = (tok.convert_tokens_to_ids(s) for s in ("<|end_of_text|>", "<|eot_id|>"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=end, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=end).save_pretrained(base)
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    r = cli_here("train", "--model", base, "--data", data, "--template", "llama-3", "--max-steps", 1, "--batch-size",
                 1, "--grad-accum", 1, "--output", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "generation_config.json").read_text())["eos_token_id"] == [end, eot]
    engine = HFEngine(str(tmp_path / "run"))
    assert stop_ids(engine.model, engine.tokenizer) == [end, eot]
    prompt = engine.tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == templates.named("llama-3", tok).render(tok, CHAT[:4], add_generation_prompt=True)
