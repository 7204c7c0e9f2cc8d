"""What was asked: YAML keys and flags come from one set of typed fields; every flag overrides its key."""

import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from speedtune.training import config
from speedtune.errors import UserError

from speedtune.commands import train  # the verb module


def two_values(f: dataclasses.Field):
    """Two different valid values of a field, the first for the YAML, the second for the flag."""
    kind = config.base_type(f)
    if f.metadata.get("choices"):
        return f.metadata["choices"][-1], f.metadata["choices"][0]
    if kind is bool:
        return True, False
    if kind is int:
        return 7, 3
    if kind is float:
        return 0.25, 0.5
    return f"yaml-{f.name}", f"flag-{f.name}"


def flag_args(name: str, value) -> list[str]:
    f = config.FIELDS[name]
    long = config.flag(name)
    if config.base_type(f) is bool:
        return [long if value else f"--no-{long[2:]}"]
    return [long, str(value)]


def parsed(monkeypatch, args: list[str]):
    seen = {}
    monkeypatch.setattr(train, "train", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    result = CliRunner().invoke(train.command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen["cfg"]


@pytest.mark.parametrize("name", list(config.FIELDS))
def test_every_flag_overrides_its_yaml_key(name, tmp_path, monkeypatch):
    yaml_value, flag_value = two_values(config.FIELDS[name])
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({name.replace("_", "-"): yaml_value}))
    assert getattr(parsed(monkeypatch, [str(p)]), name) == yaml_value  # the YAML holds without the flag
    assert getattr(parsed(monkeypatch, [str(p), *flag_args(name, flag_value)]), name) == flag_value


def test_yaml_strings_become_the_fields_types(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("lr: '2e-4'\nmax_steps: '30'\nrslora: 'yes'\nbatch-size: 4.0\n")
    cfg = config.load(str(p), {})
    assert (cfg.lr, cfg.max_steps, cfg.rslora, cfg.batch_size) == (2e-4, 30, True, 4)
    p.write_text("batch_size: 2.5\n")
    with pytest.raises(UserError, match="batch_size must be an integer"):
        config.load(str(p), {})
    p.write_text("rslora: maybe\n")
    with pytest.raises(UserError, match="rslora must be true or false"):
        config.load(str(p), {})


def test_a_saved_run_config_loads_as_what_was_asked(tmp_path):
    p = tmp_path / "run_config.yaml"
    p.write_text(yaml.safe_dump({"asked": config.RunConfig(data="d.jsonl", lr=1e-3).as_dict(),
                                 "plan": {"backend": "peft"}}))
    cfg = config.load(str(p), {"lr": 5e-4})
    assert (cfg.data, cfg.lr) == ("d.jsonl", 5e-4)


def test_choices_are_checked_in_one_place():
    with pytest.raises(UserError, match="--fit: 'fast' is not one of auto, lean, memory, off"):
        config.RunConfig(data="x", fit="fast").validate()
    with pytest.raises(UserError, match="--epochs must be positive"):
        config.RunConfig(data="x", epochs=0).validate()


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "nan", "'-inf'"])
def test_non_finite_yaml_numbers_name_the_file_and_key(text, tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(f"data: d.jsonl\nlr: {text}\n")
    with pytest.raises(UserError, match=r"run.yaml: lr must be a finite number, got -?(nan|inf); give a number such "
                                        r"as 0.0002"):
        config.load(str(p), {})
    p.write_text(f"data: d.jsonl\nmax_steps: {text}\n")  # an int field: not a whole number either
    with pytest.raises(UserError, match="run.yaml: max_steps must be an integer"):
        config.load(str(p), {})


@pytest.mark.parametrize("name", [n for n, f in config.FIELDS.items() if config.base_type(f) is float])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_setting_refuses_non_finite_values(name, value):
    """The flags and the API's settings (config.load's overrides) and a RunConfig built directly (validate)."""
    with pytest.raises(UserError, match=f"^{config.flag(name)} must be a finite number, got {value}; give a number"):
        config.load(None, {"data": "d.jsonl", name: value})
    with pytest.raises(UserError, match=f"^{config.flag(name)} must be a finite number, got {value}"):
        config.RunConfig(data="d.jsonl", **{name: value}).validate()
    method = {"method": "dpo"} if name == "beta" else {}  # --beta goes with a preference method
    assert getattr(config.load(None, {"data": "d.jsonl", name: "0.5", **method}).validate(), name) == 0.5  # stands
