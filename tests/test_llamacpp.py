"""Every GGUF that speedtune opens goes through speedtune.inference.llamacpp, so the AMX policy (no extra buffer types where
llama.cpp's AMX repacking crashes) reaches every load: GGUF chat, export verification and the server. The AMX CPU is
simulated where the machine has none (and a simulated CPU without AMX is not evaluated on one that has it): the
test records the llama_model_params that really reach llama.cpp."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import speedtune
from speedtune import hardware
from speedtune.inference import llamacpp

AMX = {"fpu", "avx2", "avx512f", "amx_bf16", "amx_int8", "amx_tile"}
NO_AMX = {"fpu", "avx2", "avx512f", "avx512_bf16"}


@pytest.fixture(scope="module")
def gguf() -> Path:
    from speedtune.models.embedded import gguf_path

    return gguf_path()


@pytest.fixture
def loads(monkeypatch):
    """The use_extra_bufts of every llama.cpp model load in the test, as llama.cpp receives it."""
    from llama_cpp import _internals

    seen: list[bool] = []
    original = _internals.LlamaModel.__init__

    def spy(self, *args, **kwargs):
        seen.append(bool(kwargs["params"].use_extra_bufts))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_internals.LlamaModel, "__init__", spy)
    return seen


def every_path(gguf: Path, tiny_model: Path) -> int:
    """Open the GGUF the way each verb does; returns how many loads that is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speedtune.exporting import gguf_tools
    from speedtune.inference.engine import Sampling
    from speedtune.inference.gguf_engine import GGUFEngine
    from speedtune.commands.serve import make_app

    assert GGUFEngine(gguf, n_ctx=256).answer([{"role": "user", "content": "Hi"}], Sampling(2, 0, 1))  # chat
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    assert gguf_tools.logit_agreement(model, tok, gguf, ["Water falls as rain."])["positions"] > 0  # export check
    assert gguf_tools.chat_check(gguf, "Hi", max_tokens=2)["answer"] is not None  # export's chat check
    assert gguf_tools.metadata(gguf)["eos_token"] == "<|im_end|>"  # export's metadata (a vocabulary-only load)
    make_app(gguf, "smol", n_ctx=256)  # serve: llama-cpp-python's server builds its own Llama
    return 5


@pytest.mark.parametrize("flags, env, expected", [(AMX, None, False), (NO_AMX, None, True), (AMX, "1", True),
                                                  (NO_AMX, "0", False)])
def test_policy(flags, env, expected, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(flags))
    if env is None:
        monkeypatch.delenv("SPEEDTUNE_LLAMA_REPACK", raising=False)
    else:
        monkeypatch.setenv("SPEEDTUNE_LLAMA_REPACK", env)
    assert llamacpp.model_param_overrides() == {"use_extra_bufts": expected}


@pytest.mark.slow
@pytest.mark.parametrize("flags, expected", [(AMX, False), (NO_AMX, True)], ids=["amx", "no-amx"])
def test_every_gguf_load_gets_the_policy(flags, expected, gguf, tiny_model, loads, monkeypatch):
    if expected and any(f.startswith("amx") for f in hardware.cpu_flags()):
        pytest.skip("this CPU really has AMX: a load with repacking would crash at its first evaluation "
                    "(ggml-org/llama.cpp#20824); the amx case runs the real thing here")
    from llama_cpp import llama_cpp as C

    original = C.llama_model_default_params  # what llama_cpp.Llama() calls for its model parameters
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(flags))
    monkeypatch.delenv("SPEEDTUNE_LLAMA_REPACK", raising=False)
    n = every_path(gguf, tiny_model)
    assert loads == [expected] * n
    # the patch is undone after each load: the function is llama-cpp-python's own again, and a Llama made outside
    # speedtune afterwards gets llama.cpp's default (repacking on), whatever the policy chose
    assert_outside_load_gets_the_default(gguf, loads)
    assert C.llama_model_default_params is original


def assert_outside_load_gets_the_default(gguf: Path, loads: list[bool]) -> None:
    import llama_cpp

    loads.clear()
    llama_cpp.Llama(model_path=str(gguf), n_ctx=64, verbose=False)  # loaded, never evaluated: safe on AMX too
    assert loads == [True]


def test_patch_is_undone_when_a_load_fails(gguf, loads, tmp_path, monkeypatch):
    from llama_cpp import llama_cpp as C

    from speedtune.errors import UserError

    original = C.llama_model_default_params
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(AMX))  # the policy sets use_extra_bufts = False
    monkeypatch.delenv("SPEEDTUNE_LLAMA_REPACK", raising=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: 1 << 20])  # a GGUF header, then the file ends: llama.cpp refuses it
    with pytest.raises(UserError, match="could not load it"):
        llamacpp.open_llama(cut)
    assert loads == [False]  # llama.cpp got the policy, then refused the file
    assert_outside_load_gets_the_default(gguf, loads)
    assert C.llama_model_default_params is original


def test_env_override_reaches_the_server(gguf, loads, monkeypatch):
    from speedtune.commands.serve import make_app

    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(NO_AMX))
    monkeypatch.setenv("SPEEDTUNE_LLAMA_REPACK", "0")
    make_app(gguf, "smol", n_ctx=256)
    assert loads == [False]


def _llama_constructions(tree: ast.AST) -> list[int]:
    """Line numbers of calls that create a llama.cpp model: Llama(...), x.Llama(...), Llama.from_pretrained(...)."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name == "Llama" or (name == "from_pretrained" and isinstance(f, ast.Attribute)
                               and getattr(f.value, "attr", getattr(f.value, "id", None)) == "Llama"):
            out.append(node.lineno)
    return out


def test_only_llamacpp_module_constructs_llama():
    root = Path(speedtune.__file__).parent
    found = {str(p.relative_to(root)): lines for p in sorted(root.rglob("*.py"))
             if (lines := _llama_constructions(ast.parse(p.read_text(), str(p))))}
    assert set(found) == {"inference/llamacpp.py"}, found
    # and the checker does see a construction written any of the ways it could be
    assert _llama_constructions(ast.parse("import llama_cpp\nllama_cpp.Llama(model_path='x')\nLlama('y')\n"
                                          "llama_cpp.Llama.from_pretrained('r', 'f')")) == [2, 3, 4]


def test_server_app_is_built_only_in_serve():
    """llama-cpp-python's server creates its own Llama inside create_app: only serve.make_app may call it (and the
    load test above shows that what it builds gets the policy)."""
    root = Path(speedtune.__file__).parent
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "create_app(" in p.read_text())
    assert callers == ["commands/serve.py"]
