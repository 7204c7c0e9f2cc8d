"""setuptools installs only the packages pyproject lists: every package folder of speedtune/ must be among them (a
subpackage left out would import from a clone and be missing from an installed copy)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "speedtune").rglob("__init__.py")}
    assert "speedtune.training.backends" in found and found <= listed, sorted(found - listed)
