import json
import shutil

import numpy as np
import pytest
from conftest import assert_user_error, cli_here

from speedtune.data import templates
from speedtune.exporting.deploy import modelfile


@pytest.fixture(scope="module")
def peft_merge(real_run, tokenizer):
    """Computed here, apart from the exporter: PEFT's `merge_and_unload()` of the run's adapter into its base in fp32,
    and the base alone, on a few texts (the run's own rows, where the adapter changes most, and a plain sentence).
    Returns (token ids per text, base logits, merged logits), positions stacked."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from speedtune.models.registry import resolve_model
    from speedtune.paths import demo_dir

    rows = [json.loads(line)["messages"] for line in (demo_dir() / "identity.jsonl").read_text().splitlines()]
    texts = [tokenizer.apply_chat_template(rows[i], tokenize=False) for i in (0, 7, 30)]
    texts.append("Bread rises because yeast turns sugar into carbon dioxide, and the gas is trapped in the dough.")
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()

    def logits(m):
        with torch.no_grad():
            return np.concatenate([m(torch.tensor([i])).logits[0].double().numpy() for i in ids])

    base = logits(model)
    merged = logits(PeftModel.from_pretrained(model, real_run).merge_and_unload().eval())
    return ids, base, merged


def _gguf_logits(path, ids):
    import numpy as np

    from speedtune.inference.llamacpp import open_llama  # the AMX-safe load; the logits are llama.cpp's own

    llm = open_llama(path, n_ctx=512, logits_all=True)
    out = []
    for i in ids:
        llm.reset()
        llm.eval(i)
        out.append(np.array(llm.scores[: len(i)], dtype=np.float64))
    llm.close()
    return np.concatenate(out)


def _kl(p, q) -> float:
    """Mean over positions of KL(softmax p || softmax q)."""
    import torch

    lp, lq = torch.log_softmax(torch.from_numpy(p), -1).numpy(), torch.log_softmax(torch.from_numpy(q), -1).numpy()
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _top1(p, q) -> float:
    return float((p.argmax(-1) == q.argmax(-1)).mean())


# Tolerances, measured on the session run (the quickstart's 60 steps; 192 positions): the adapter moves the base by
# KL(merge || base) = 2.35 (top-1 agreement 51%). Against PEFT's fp32 merge, the f16 GGUF (converted from the f16
# staging copy) is at KL 7e-6 (top-1 100%), our bf16 merged-16bit at 0.0028 (97.9%: bf16 keeps 8 bits of mantissa),
# the q8_0 GGUF at 0.013 (96.9%). The bounds are fractions of the adapter's own KL, each 10 to 300 times what was
# measured, and far under what a merge that lost, halved or doubled the adapter gives (a fraction near 1).
F16_KL, MERGED_KL, Q8_KL = 1e-3, 1e-2, 5e-2


@pytest.mark.slow
def test_gguf_export_is_verified_and_ready_for_ollama(exported, real_run, peft_merge):
    """The f16 GGUF of the shared export and the q8_0 of the quickstart's own export (RUN/export): each GGUF type
    built once in the test run."""
    ids, base, merged = peft_merge
    adapter = _kl(merged, base)
    assert adapter > 0.1 and _top1(merged, base) < 0.9  # the run changed the model: the checks below can tell
    quick = real_run / "export"
    f16, q8 = _gguf_logits(next(exported.glob("*-f16.gguf")), ids), _gguf_logits(next(quick.glob("*-q8_0.gguf")), ids)
    assert _kl(merged, f16) < F16_KL * adapter and _top1(merged, f16) >= 0.99, (_kl(merged, f16), adapter)
    assert _kl(merged, q8) < Q8_KL * adapter and _top1(merged, q8) >= 0.9, (_kl(merged, q8), adapter)

    reports = {d: json.loads((d / "export_report.json").read_text()) for d in (exported, quick)}
    by = {g["quant"]: (d, g) for d, report in reports.items() for g in report["gguf"]}
    for q in ("f16", "q8_0"):
        folder, g = by[q]
        meta = g["metadata"]
        assert meta["pre"] == "smollm" and meta["eos_id"] == 2 and meta["eos_token"] == "<|im_end|>"
        assert meta["has_chat_template"] and meta["add_bos"] is False
        assert g["chat"]["finish_reason"] == "stop" and g["chat"]["answer"]
        assert (folder / g["name"]).stat().st_size == g["size_bytes"]
    f16_entry, q8_entry = by["f16"][1], by["q8_0"][1]
    assert f16_entry["top1_agreement"] >= 0.99 and f16_entry["quality_ok"] and f16_entry["drifted"] == []
    assert q8_entry["top1_agreement"] >= 0.95
    assert f16_entry["mean_kl"] < q8_entry["mean_kl"] < 0.05
    for folder, report in reports.items():
        mf = (folder / "Modelfile").read_text()
        assert f"FROM ./{report['preferred']}" in mf and 'PARAMETER stop "<|im_end|>"' in mf and "SYSTEM" in mf
    assert list((exported / "lmstudio" / "speedtune").glob("*-GGUF/*.gguf"))
    assert not list(exported.parent.glob(".*partial*")) and not list(exported.glob(".*.gguf"))  # no f16 intermediate
    assert not (quick / "merged-16bit").exists()  # the merged folder is kept only when asked for (--merged 16bit)
    assert not (exported / ".merged-f16").exists() and not (quick / ".merged-f16").exists()


@pytest.mark.slow
def test_merged_16bit_is_peft_merge_and_loads_in_transformers(exported, peft_merge):
    """The shared export's merged-16bit/ (asked for beside GGUFs: written after they were verified)."""
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported / "merged-16bit", dtype="auto").eval()
    tok = AutoTokenizer.from_pretrained(exported / "merged-16bit")
    assert model.config.architectures == ["LlamaForCausalLM"] and tok.eos_token == "<|im_end|>"
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # 16-bit on disk, as the base ships
    ids, base, merged = peft_merge
    with torch.no_grad():
        ours = np.concatenate([model.float()(torch.tensor([i])).logits[0].double().numpy() for i in ids])
    assert _kl(merged, ours) < MERGED_KL * _kl(merged, base) and _top1(merged, ours) >= 0.95, _kl(merged, ours)


CONVOS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Thanks"}],
]


@pytest.mark.parametrize("name", [None, "chatml", "alpaca", "zephyr", "mistral"])
def test_modelfile_template_renders_like_the_training_template(name, tokenizer, go_render):
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
    assert_user_error(cli_here("export", tmp_path, "--gguf", "q8_0"), "not a run folder")
    assert_user_error(cli_here("export", real_run, "--gguf", "q9_9"), "unknown quant 'q9_9'", "q4_k_m")
    broken = tmp_path / "orphan"
    shutil.copytree(real_run, broken, ignore=shutil.ignore_patterns("checkpoints", "export"))
    (broken / "run_config.yaml").unlink()
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    assert_user_error(cli_here("export", broken, "--gguf", "q8_0"), "base model", "can't be found")
    alien = tmp_path / "alien"
    shutil.copytree(tiny_model, alien)
    c = json.loads((alien / "config.json").read_text())
    c["architectures"] = ["AlienForCausalLM"]
    (alien / "config.json").write_text(json.dumps(c))
    assert_user_error(cli_here("export", alien, "--gguf", "f16"), "does not know the architecture AlienForCausalLM")
    r = cli_here("export", real_run, "--push-to-hub", "me/model", env={"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""})
    assert_user_error(r, "--push-to-hub needs a token in the HF_TOKEN environment variable")
    assert_user_error(cli_here("export", real_run, "--merged", "4bit"), "--merged 4bit needs a CUDA GPU")
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_user_error(cli_here("export", real_run, "--gguf", "q8_0", "--output", existing), "exists and is not empty")
    assert (existing / "keep.txt").read_text() == "mine"


def test_too_little_disk_leaves_nothing(real_run, tmp_path, monkeypatch):
    import collections
    import shutil

    from speedtune.errors import UserError
    from speedtune.exporting.export import export_run

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 10**6))
    with pytest.raises(UserError, match="too little disk"):
        export_run(real_run, tmp_path / "out", gguf=["f16", "q4_k_m"])
    assert list(tmp_path.iterdir()) == []


def test_verification_table_fits_80_columns_and_keeps_the_answer():
    from rich.console import Console

    from speedtune.exporting.gguf import print_report

    answer = "The capital of France is Paris, a city on the Seine known for the Eiffel Tower."
    behaviour = {"prompts": 7, "matches": 5, "merged_stops": 5}
    entry = {"size_bytes": 138_100_000, "top1_agreement": 0.981, "mean_kl": 0.0045, "quality_ok": True, "verdict": "ok",
             "chat": {"stops_on_eos": True, "answer": answer}, "behaviour": behaviour, "drifted": []}
    drift = {"prompt": "Say hello in French.", "merged": "Bonjour!", "gguf": "Bonjour, je m'aime, je m'aime, [je]",
             "merged_tokens": 4, "gguf_tokens": 24}
    report = {"output": "/tmp/out", "gguf": [{**entry, "name": "quickstart-20261123-183000-q8_0.gguf"},
                                              {**entry, "name": "m-q4_k_m.gguf", "quality_ok": False,
                                               "verdict": "drifts: ...", "drifted": [drift]}]}
    console = Console(width=80, record=True, color_system=None)
    print_report(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    table = text.split("KL: mean KL")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("│")]
    assert all(ln.endswith("│") for ln in rows)  # nothing cut at the right edge
    answer_cells = " ".join(ln.rstrip("│ ").rsplit("│", 1)[1].strip() for ln in rows)
    assert answer_cells.count(answer) == 2  # folded over lines, never cut
    first, second = [ln for ln in rows if "98.1%" in ln]  # each entry's first line
    assert " 5/7 " in first and " 5/5 " in first and " 5/7 " in second and " 4/5 " in second
    warning = text.split("WARNING: ", 1)[1]
    assert "m-q4_k_m.gguf drifts" in warning and "[je]" in warning.replace("\n", "")  # model text, not markup


@pytest.mark.slow
def test_quantiser_output_goes_to_the_log_not_the_terminal(exported):
    """The shared export's q4_0 is quantised by llama.cpp from its f16 conversion; the export's terminal output is
    kept beside it."""
    out, err = (exported.parent / "export.stdout").read_text(), (exported.parent / "export.stderr").read_text()
    log = (exported / "quantize.log").read_text()
    assert log.count("converting to q4_0") + log.count("converting to q") > 100  # llama.cpp's per-tensor lines
    assert "converting to" not in err + out and "llama_model_quantize" not in err + out
    assert "quantize.log" in err
    report = json.loads((exported / "export_report.json").read_text())
    assert report["log"] == str(exported / "quantize.log") and [g["quant"] for g in report["gguf"]] == ["f16", "q4_0"]
