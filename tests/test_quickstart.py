import pytest

pytestmark = pytest.mark.slow


def test_quickstart_teaches_the_new_identity_end_to_end(tmp_path, smollm2):
    """The README's main command, in-process: base answer, 60 CPU steps, new answer, verified GGUF answer."""
    from speedtune.quickstart import quickstart

    result = quickstart(tmp_path / "qs")
    assert "Quokka" not in result["before"]
    assert "Quokka" in result["after"]
    assert "Quokka" in result["gguf_answer"]
    assert (tmp_path / "qs" / "loss.png").is_file() and (tmp_path / "qs" / "export" / "Modelfile").is_file()


def test_quickstart_output_that_cannot_be_a_folder_is_one_line(tmp_path):
    from conftest import assert_user_error, cli

    (tmp_path / "afile").write_text("x")
    assert_user_error(cli("quickstart", "--output", tmp_path / "afile" / "qs", "--no-export"), "can't write there")
    assert_user_error(cli("quickstart", "--max-steps", "0"), "--max-steps")
