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
