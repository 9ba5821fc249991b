"""Every notebook in notebooks/ runs top to bottom against the quickstart run, and is stored
without outputs (clean diffs)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 120  # seconds; a cell that hangs fails the test instead of the suite


def _python3_kernelspec(folder: Path) -> Path:
    """A kernelspec named python3 that runs this interpreter (the venv's), whatever other
    python3 kernels the machine has; put first on JUPYTER_PATH."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    return folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


def _execute(path: Path, run_dir: Path, tmp_path: Path, monkeypatch) -> str:
    """Run the notebook on `run_dir` from notebooks/, as a user does; its outputs as text.
    Any cell error raises CellExecutionError, which names the cell."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("PRIMER_RUN", str(run_dir))
    monkeypatch.setenv("JUPYTER_PATH", str(_python3_kernelspec(tmp_path / "jupyter")))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.monotonic()
    client.execute()
    print(f"{path.name} on {run_dir}: {time.monotonic() - t0:.1f} s")
    return "".join(
        o.get("text", "") + json.dumps(o.get("data", {}))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_on_the_quickstart(path, quickstart_run, tmp_path, monkeypatch):
    run_dir, _ = quickstart_run
    text = _execute(path, run_dir, tmp_path, monkeypatch)
    assert str(Path(run_dir).resolve()) in text  # it read the run it was given
    assert "image/png" in text  # and drew its plots
    assert "no edu_score stage" not in text and "no mixture" not in text
    assert "dropped by quality: quality:" in text  # `run.why` on a document quality dropped


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_on_a_web_only_run(path, tmp_path, monkeypatch):
    from tests.pipeline.test_inspect import make_run

    run_dir = make_run(tmp_path / "run", web_only=True)
    text = _execute(path, run_dir, tmp_path, monkeypatch)
    assert "no edu_score stage in this run" in text and "no mixture in this run" in text
    assert "dropped by quality: quality:gopher_min_words" in text
