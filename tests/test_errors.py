"""User mistakes in the verbs chat, serve, export, data and models: each is one `error: ...` line and a non-zero exit,
never a traceback. One test per class of mistake, through the real CLI."""

from __future__ import annotations

import shutil
import socket

import pytest
from conftest import assert_user_error, cli, cli_here


@pytest.fixture(scope="module")
def gguf():
    from speedtune.models.embedded import gguf_path

    return gguf_path()


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("files") / "notes.txt"
    f.write_text("not a model\n")
    return f


def test_a_file_that_is_not_a_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("hello\n")
    for verb in (["serve", fake], ["chat", fake, "-p", "hi"]):
        assert_user_error(cli(*verb), "model.gguf: not a GGUF file")


def test_a_truncated_gguf(gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with gguf.open("rb") as f:
        cut.write_bytes(f.read(gguf.stat().st_size // 4))  # an unfinished download: the header is fine
    assert_user_error(cli("chat", cut, "-p", "hi"), "cut.gguf: llama.cpp could not load it", "truncated")
    assert_user_error(cli("serve", cut, "--port", free_port()), "cut.gguf: llama.cpp could not load it", "truncated")


@pytest.mark.slow
def test_a_folder_where_a_file_is_expected_and_a_file_where_a_folder_is(tmp_path, a_file):
    (tmp_path / "model.gguf").mkdir()
    assert_user_error(cli_here("chat", tmp_path / "model.gguf", "-p", "hi"), "is a folder, not a GGUF file")
    (tmp_path / "data.jsonl").mkdir()
    assert_user_error(cli_here("data", "check", tmp_path / "data.jsonl"), "the folder has no .json, .jsonl")
    assert_user_error(cli_here("export", a_file), "notes.txt is a file; export takes a run folder")
    assert_user_error(cli_here("chat", a_file, "-p", "hi"), "notes.txt is a file; a model is a Hugging Face folder")
    assert_user_error(cli_here("data", "check", a_file), "unsupported file type '.txt'")


def test_incomplete_folders(real_run, tiny_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns("checkpoints", "adapter_model.safetensors"))
    for verb in (["chat", run, "-p", "hi"], ["export", run, "--gguf", "q8_0"], ["serve", run]):
        assert_user_error(cli(*verb), "run folder has no adapter weights (adapter_model.safetensors)")
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    assert_user_error(cli_here("chat", model, "-p", "hi"), "has config.json but no weights")


@pytest.mark.parametrize("name, content, needles", [
    ("latin1.csv", "instruction,output\ncaf\xe9,ok\n".encode("latin-1"),
     ["latin1.csv line 2 (byte 22): not UTF-8 text", "must be UTF-8", "iconv -f latin1"]),
    ("latin1.jsonl", '{"instruction": "a", "output": "ok"}\n{"text": "h\xe9"}\n'.encode("latin-1"),
     ["latin1.jsonl line 2 (byte 48): not UTF-8"]),
    ("utf16.json", '[{"text": "hi"}]'.encode("utf-16"), ["utf16.json line 1 (byte 0)", "UTF-16", "iconv -f utf-16"]),
    ("binary.jsonl", bytes(range(256)) * 8, ["binary.jsonl: looks like a binary file", "must be UTF-8"]),
    ("binary.parquet", b"PAR1" + bytes(range(256)) * 4, ["binary.parquet: not a readable parquet file"]),
])
def test_data_files_in_the_wrong_encoding_or_binary(name, content, needles, tmp_path, smollm2):
    (tmp_path / name).write_bytes(content)
    assert_user_error(cli_here("data", "check", tmp_path / name), *needles)


@pytest.mark.parametrize("args, needles", [
    (["serve", "GGUF", "--port", "70000"], ["--port 70000: out of range, use a value from 1 to 65535"]),
    (["serve", "GGUF", "--port", "eighty"], ["--port 'eighty': not a whole number"]),
    (["serve", "GGUF", "--n-ctx", "100000000"], ["--n-ctx 100000000: out of range", "trained for 8192 tokens"]),
    (["serve", "GGUF", "--request-timeout", "0"], ["--request-timeout 0: out of range"]),
    (["chat", "GGUF", "-p", "hi", "--max-new-tokens", "100000000"], ["--max-new-tokens 100000000", "context is 8192"]),
    (["chat", "GGUF", "-p", "hi", "--top-p", "2"], ["--top-p 2: out of range, use a value from 0 to 1"]),
    (["data", "preview", "DATA", "-n", "0"], ["-n 0: out of range, use a value at least 1"]),
    (["data", "check", "DATA", "--seq-len", "8"], ["--seq-len 8: out of range, use a value at least 16"]),
    (["export", "RUN", "--merged", "8bit"], ["--merged '8bit': not one of 16bit, 4bit"]),
])
def test_numbers_and_choices_out_of_range(args, needles, gguf, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    run = tmp_path / "run"
    run.mkdir()
    args = [{"GGUF": gguf, "DATA": data, "RUN": run}.get(a, a) for a in args]
    # serve and chat read the GGUF through llama.cpp, whose C logging only a process of their own captures
    assert_user_error((cli if args[0] in ("serve", "chat") else cli_here)(*args), *needles)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_already_in_use(gguf):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_user_error(cli("serve", gguf, "--port", port), f"--port {port}: 127.0.0.1:{port} is already in use")


def test_outputs_that_cannot_be_written(real_run, a_file, tmp_path):
    """Root ignores permission bits, so the unwritable places are ones no one can write: under a file, a file."""
    assert_user_error(cli_here("export", real_run, "--gguf", "q8_0", "--output", a_file / "out"),
                      "notes.txt is a file, so no folder can be made under it")
    assert_user_error(cli_here("export", real_run, "--gguf", "q8_0", "--output", a_file), "is a file; give a folder")
    r = cli_here("models", "pull", "smollm2-135m", "--force", env={"SPEEDTUNE_HOME": str(a_file / "home")})
    assert_user_error(r, "can't write the model cache", "set SPEEDTUNE_HOME")
    assert a_file.read_text() == "not a model\n"


@pytest.mark.parametrize("args, needles", [
    (["train", "--data", "DATA", "--lr", "nan"], ["--lr must be a finite number, got nan", "such as 0.0002"]),
    (["train", "--data", "DATA", "--lr", "inf"], ["--lr must be a finite number, got inf"]),
    (["train", "--data", "DATA", "--lr=-inf"], ["--lr must be a finite number, got -inf"]),
    (["train", "--data", "DATA", "--epochs", "inf"], ["--epochs must be a finite number, got inf"]),
    (["train", "--data", "DATA", "--memory-cap-gb", "NaN"], ["--memory-cap-gb must be a finite number, got nan"]),
    (["train", "--data", "DATA", "--max-steps", "inf"], ["--max-steps 'inf': not a whole number"]),
    (["train", "YAML"], ["run.yaml: lr must be a finite number, got nan"]),
    (["chat", "x.gguf", "-p", "hi", "--temperature", "nan"],
     ["--temperature must be a finite number, got nan; give a number from 0 to 100"]),
    (["chat", "x.gguf", "-p", "hi", "--top-p", "-inf"], ["--top-p must be a finite number, got -inf"]),
    (["chat", "x.gguf", "-p", "hi", "--max-new-tokens", "inf"], ["--max-new-tokens 'inf': not a whole number"]),
    (["serve", "x.gguf", "--request-timeout", "inf"], ["--request-timeout must be a finite number, got inf"]),
    (["serve", "x.gguf", "--port", "nan"], ["--port 'nan': not a whole number"]),
    (["quickstart", "--max-steps", "inf"], ["--max-steps 'inf': not a whole number"]),
    (["data", "preview", "DATA", "--seq-len", "nan"], ["--seq-len 'nan': not a whole number"]),
])
def test_non_finite_numbers_are_one_line_and_exit_2(args, needles, tmp_path):
    """Every verb's numeric flags (and a YAML's `.nan`) are refused while the command line is read: before a model
    loads or a folder is made, so each takes about a second."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {data}\nlr: .nan\n")
    r = cli_here(*[{"DATA": data, "YAML": config}.get(a, a) for a in args], cwd=tmp_path)
    assert_user_error(r, *needles)
    assert r.returncode == 2, r.stderr
    assert sorted(tmp_path.iterdir()) == sorted([data, config])  # nothing written: no run folder
