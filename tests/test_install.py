"""Install instructions name our own distribution: "speedtune" on PyPI is another project, so every install command
(pyproject, the notebooks' first cells, the error hints, the README) says speedtune-llm from the repository."""

import json
import re
import tomllib
from pathlib import Path

from speedtune.errors import DISTRIBUTION, SOURCE, install_hint

ROOT = Path(__file__).resolve().parent.parent
# `pip install speedtune`, `"speedtune[gpu]"`, `speedtune==0.1`: the other project's name as a requirement
FOREIGN = re.compile(r"""(pip install[^\n]*?[ '"]speedtune(\[|==|[ '"]|$))|(['"]speedtune\[)""", re.M)


def test_the_distribution_and_its_source_are_set_in_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == DISTRIBUTION != "speedtune"
    assert SOURCE == "git+" + meta["urls"]["Repository"]
    assert meta["scripts"]["speedtune"] == "speedtune.cli:main"


def test_the_notebooks_install_cells_install_this_repository():
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        install = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        spec = re.search(r'SPEEDTUNE = "([^"]+)"', install)
        assert spec, f"{nb.name}: the first code cell sets SPEEDTUNE"
        assert re.fullmatch(rf"{re.escape(DISTRIBUTION)}\[[a-z,]+\] @ {re.escape(SOURCE)}", spec.group(1)), spec
        assert '%pip install -q "{SPEEDTUNE}"' in install, install


def test_no_install_command_names_the_other_project():
    files = [ROOT / "README.md", *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("speedtune/**/*.py")]
    bad = [f"{f.relative_to(ROOT)}: {m.group(0).strip()}" for f in files for m in FOREIGN.finditer(f.read_text())]
    assert not bad, bad
    assert FOREIGN.search("pip install 'speedtune[ui]'") and FOREIGN.search("%pip install speedtune\n")
    assert not FOREIGN.search(install_hint("ui"))
