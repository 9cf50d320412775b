"""Every notebook under notebooks/ runs top to bottom (nbclient, the python3 kernel of this
interpreter) on the results of the tiny workflow, and draws its figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
#: Figures each notebook draws per arch (continual) or in all (pruning: one per scope; explosion:
#: accuracy, telemetry and traces, the quick configuration traces attention runs).
MIN_FIGURES = {"continual_learning.ipynb": 3, "gradient_explosion.ipynb": 3, "pruning.ipynb": 2}


def test_notebooks_are_committed_clean():
    """No outputs or execution counts in the repository; the kernel is the plain python3 one."""
    assert [p.name for p in NOTEBOOKS] == sorted(MIN_FIGURES)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


def results_for(notebook: Path, workflow_dir: Path, tmp_path: Path) -> Path:
    """The tiny workflow's results; for the pruning notebook, while the quick configuration has no
    pruning section, a results folder holding a synthetic pruning_curves.csv in the agreed format."""
    results = workflow_dir / "results"
    if notebook.name == "pruning.ipynb" and not (results / "tables/pruning_curves.csv").exists():
        from test_figures import synthetic_pruning

        results = tmp_path / "results"
        (results / "tables").mkdir(parents=True)
        synthetic_pruning().to_csv(results / "tables/pruning_curves.csv", index=False)
    return results


@pytest.mark.workflow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_workflow_results(notebook, tiny_workflow, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("EWCSTAB_RESULTS", str(results_for(notebook, tiny_workflow, tmp_path)))
    nb = nbformat.read(notebook, as_version=4)
    # raises CellExecutionError, with the failing cell and its traceback, if any cell fails
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert images >= MIN_FIGURES[notebook.name]
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert not errors
