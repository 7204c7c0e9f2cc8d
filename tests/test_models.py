import json

import pytest
from conftest import assert_user_error, cli_here

from speedtune.errors import UserError
from speedtune.models.registry import resolve_model


def test_embedded_checkpoint_is_what_llamacpp_and_generation_need(smollm2):
    tok = json.loads((smollm2 / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and not tok["model"].get("byte_fallback")
    kinds = [p["type"] for p in tok["pre_tokenizer"]["pretokenizers"]]
    assert kinds == ["Digits", "ByteLevel"]
    assert tok["decoder"]["type"] == "ByteLevel"
    gen = json.loads((smollm2 / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    assert (smollm2 / "model.safetensors").stat().st_size > 200e6
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2)
    assert t.eos_token == "<|im_end|>" and t.eos_token_id == 2
    assert t.decode(t("Hello 2024 world!").input_ids) == "Hello 2024 world!"
    assert "<|im_start|>assistant" in t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                           add_generation_prompt=True)


def test_resolve_folder_and_errors(tiny_model, tmp_path):
    assert resolve_model(str(tiny_model)) == tiny_model
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="smollm2-135m"):
        resolve_model("no-such-alias")


def test_cli_unknown_alias_lists_known_ones():
    assert_user_error(cli_here("chat", "smollm9", "--prompt", "hi"), "unknown model 'smollm9'", "smollm2-135m",
                      "llama-3-8b")


def test_cli_hub_id_without_network_is_one_clear_line():
    r = cli_here("chat", "nobody-here/not-a-model", "--prompt", "hi", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(r, "could not download 'nobody-here/not-a-model'", "Offline?")


def test_models_list_and_pull(smollm2):
    r = cli_here("models", "list")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "pulled" in r.stdout
    r = cli_here("models", "pull", "smollm2-135m")
    assert r.returncode == 0 and r.stdout.strip() == str(smollm2)


@pytest.mark.slow
def test_one_shot_answer_on_the_real_model(smollm2):
    r = cli_here("chat", "smollm2-135m", "--prompt", "What is the capital of France? Answer in one word.",
            "--max-new-tokens", "20", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 1  # only the answer


def test_help_lists_only_working_verbs():
    """Every verb `speedtune --help` lists runs (its module imports and gives a command: its own --help works), and
    every verb is listed."""
    import re

    from click.testing import CliRunner

    from speedtune.cli import VERBS, group

    r = CliRunner().invoke(group, ["--help"], prog_name="speedtune")
    assert r.exit_code == 0, r.output
    listed = re.findall(r"^  (\S+)  ", r.output.split("Commands:", 1)[1], re.M)
    assert listed == list(VERBS)
    for verb in listed:
        r = CliRunner().invoke(group, [verb, "--help"], prog_name="speedtune")
        assert r.exit_code == 0 and f"Usage: speedtune {verb} " in r.output, (verb, r.output, r.exception)
