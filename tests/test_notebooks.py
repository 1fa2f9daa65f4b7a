"""Execute every notebook in ``notebooks/`` top to bottom and check its outputs.

The kernel is this test's own interpreter: a ``python3`` kernelspec pointing at
``sys.executable`` is written to a temporary directory and used through a private
``KernelSpecManager``, so neither a user-level kernelspec nor the environment's PATH can
pick another Python (and nothing is installed into the environment).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Plain imports: the notebook test fails (never skips) when its [test] dependencies are missing.
import nbclient
import nbformat
from ipykernel.kernelspec import write_kernel_spec  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec manager whose only ``python3`` kernel runs ``sys.executable``."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(path=str(kernels / "python3"))
    manager = KernelSpecManager(kernel_dirs=[str(kernels)])
    assert manager.get_kernel_spec("python3").argv[0] == sys.executable
    return manager


def execute(path: Path, kernel_specs: KernelSpecManager):
    """Run ``path`` with the notebook's directory as working directory; returns the executed notebook."""
    notebook = nbformat.read(path, as_version=4)
    kernel = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(
        notebook,
        km=kernel,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def outputs(notebook, output_type=None):
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output_type is None or output.output_type == output_type:
                yield output


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_specs):
    notebook = execute(path, kernel_specs)
    errors = [f"{o.ename}: {o.evalue}" for o in outputs(notebook, "error")]
    assert not errors, errors
    if path.name == "quickstart.ipynb":
        tables = [
            o.data["text/html"]
            for o in outputs(notebook)
            if "data" in o and "text/html" in o.data
        ]
        assert any("NUTS sd" in t and "truth" in t and "w[1, x1]" in t for t in tables), (
            "the EM/SVI/NUTS/truth comparison table was not displayed"
        )
        assert any("test explained variance" in t and "oracle" in t for t in tables)
        assert any("image/png" in o.get("data", {}) for o in outputs(notebook)), "no figure"
        stdout = "".join(o.text for o in outputs(notebook, "stream") if o.name == "stdout")
        assert "quickstart checks passed" in stdout
