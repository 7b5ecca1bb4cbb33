"""Every notebook executes top to bottom (nbclient); the committed .ipynb files are what
notebooks/make_notebooks.py generates. The paper-data notebooks read the shipped notebooks/data."""
from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the integration lane, `make test-slow` (a separate CI step)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = os.path.join(ROOT, "notebooks")
NAMES = ["attack_effectiveness", "attack_convergence", "aa_sanity_check", "learning_curves", "advex_example",
         "data_augmentations"]


def test_committed_notebooks_are_generated(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(NB_DIR, "make_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write_all(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(f"{n}.ipynb" for n in NAMES)
    for path in written:
        with open(path) as fresh, open(os.path.join(NB_DIR, os.path.basename(path))) as committed:
            assert fresh.read() == committed.read(), f"regenerate: python notebooks/make_notebooks.py"


def test_an_empty_out_is_an_error_not_the_working_directory(tmp_path, capsys, monkeypatch):
    """--out '' wrote all six notebooks into the working directory (the repository root, run from there)."""
    import importlib.util

    from src.errors import run_cli

    spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(NB_DIR, "make_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    assert run_cli(module.main, ["--out", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: make_notebooks.py: argument --out: must be a non-empty path")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: tiny models, shared cores
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": NB_DIR}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure"
