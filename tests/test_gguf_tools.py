"""speedtune.exporting.gguf_tools: what it asks llama.cpp's converter, and what it keeps of the answer."""

import json

from speedtune.exporting import gguf_tools


def test_the_converters_architectures_are_its_own_map_kept_per_installed_converter(tmp_path, monkeypatch):
    """The first call imports the converter's package and writes its names to the cache; the next call reads the
    cache (the import takes seconds, once for every export)."""
    monkeypatch.setenv("SPEEDTUNE_HOME", str(tmp_path))
    from conversion import TEXT_MODEL_MAP

    first = gguf_tools.converter_architectures()
    assert first == set(TEXT_MODEL_MAP) and "LlamaForCausalLM" in first
    cached = list((tmp_path / "converter").glob("architectures-*.json"))
    assert len(cached) == 1 and set(json.loads(cached[0].read_text())) == first
    cached[0].write_text(json.dumps(["OnlyThisOne"]))  # what the cache says is what the next call answers
    assert gguf_tools.converter_architectures() == {"OnlyThisOne"}
    cached[0].write_text("{broken")  # a damaged cache is asked again, and rewritten
    assert gguf_tools.converter_architectures() == first
