"""examples/quickstart.ipynb executes without error (so it cannot rot)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def test_quickstart_notebook_executes(monkeypatch):
    import lmkern
    # the kernel runs in examples/: let it import the lmkern this test imported (installed or in-tree)
    here = os.path.dirname(os.path.dirname(os.path.abspath(lmkern.__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "saved without outputs"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
