"""speedtune.data.ahead: the data tokenised in a real side process (the one `speedtune train` starts before Unsloth's
import) gives the rows an in-process build gives, and a bad row's one-line error."""

import json

import pytest

from speedtune.data import ahead
from speedtune.data.dataset import DataOptions, build
from speedtune.errors import UserError

ROWS = [{"instruction": f"Say {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(40)]


def write(path, rows):
    path.write_text(json.dumps(rows, indent=2))  # a pretty-printed JSON array, as LLaMA-Factory ships data
    return path


def test_the_side_process_builds_what_an_in_process_build_does(tmp_path, smollm2, tokenizer):
    opts = DataOptions(str(write(tmp_path / "a.json", ROWS)))
    side = ahead.start(opts, str(smollm2), 256)
    got, want = side.built(), build(opts, tokenizer, 256)
    assert [(e.input_ids, e.labels, e.where) for e in got.examples] == \
        [(e.input_ids, e.labels, e.where) for e in want.examples]
    assert (got.format, got.template.name, got.fixed) == (want.format, want.template.name, want.fixed)
    assert not side.out.exists() and side.proc.returncode == 0


def test_a_bad_row_is_the_same_one_line_error(tmp_path, smollm2, tokenizer):
    rows = [*ROWS[:5], {"instruction": "long", "output": "word " * 400}]
    opts = DataOptions(str(write(tmp_path / "bad.json", rows)))
    with pytest.raises(UserError) as in_process:
        build(opts, tokenizer, 256)
    with pytest.raises(UserError) as side:
        ahead.start(opts, str(smollm2), 256).built()
    assert str(side.value) == str(in_process.value) and "bad.json" in str(side.value)
    assert side.value.exit_code == in_process.value.exit_code == 1


def test_a_child_that_dies_leaves_the_build_to_the_parent(tmp_path, smollm2):
    side = ahead.start(DataOptions(str(write(tmp_path / "a.json", ROWS))), str(smollm2), 256)
    side.proc.kill()
    assert side.built() is None and not side.out.exists()


def test_wanted_only_before_unsloths_import(monkeypatch):
    assert ahead.wanted("unsloth") and not ahead.wanted("peft")
    monkeypatch.setenv("SPEEDTUNE_DATA_AHEAD", "0")
    assert not ahead.wanted("unsloth")
