import pytest

pytestmark = pytest.mark.slow


def test_quickstart_teaches_the_new_identity_end_to_end(quickstart_result):
    """The README's main command, in-process (the shared fixture runs it once): base answer, 60 CPU steps, new answer,
    verified GGUF answer."""
    from pathlib import Path

    result, run = quickstart_result, Path(quickstart_result["run"])
    assert "Quokka" not in result["before"]
    assert "Quokka" in result["after"]
    assert "Quokka" in result["gguf_answer"]
    assert (run / "loss.png").is_file() and (run / "export" / "Modelfile").is_file()
    assert Path(result["gguf"]).is_file() and Path(result["gguf"]).parent == run / "export"


def test_quickstart_output_that_cannot_be_a_folder_is_one_line(tmp_path):
    from conftest import assert_user_error, cli_here

    (tmp_path / "afile").write_text("x")
    assert_user_error(cli_here("quickstart", "--output", tmp_path / "afile" / "qs", "--no-export"), "can't write there")
    assert_user_error(cli_here("quickstart", "--max-steps", "0"), "--max-steps")
