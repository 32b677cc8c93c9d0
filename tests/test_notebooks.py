"""Run every notebook in `notebooks/` from top to bottom, as a user would.

Each notebook runs in a fresh Jupyter kernel of the interpreter running pytest, with
`GQDIFFRAX_NOTEBOOK_SMALL=1` so that it shrinks its sizes and finishes in under a minute
on a 2-core CPU. Those runs are `slow`: `pytest -m "not slow"` leaves them out.
"""

import json
import os
import pathlib
import sys

import pytest


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
# Seconds one cell may take; compiling a gradient takes most of it.
CELL_TIMEOUT = 300
KERNEL_NAME = "gqdiffrax-tests"
# Extra XLA flags for particular notebooks, added to conftest's: the sharding notebook
# runs on a CPU split into two devices, so that its multi-device code path is exercised.
EXTRA_FLAGS = {"05_gpu_training": "--xla_force_host_platform_device_count=2"}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec that starts this very interpreter, so that the notebooks run in the
    environment under test, not in whichever `python3` kernel Jupyter finds first."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "gqdiffrax tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return root


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS


def test_notebooks_stored_executed():
    # The notebooks are stored with the outputs of a full-size run, top to bottom, so
    # that they read as executed on GitHub and in the docs; no cell may hold an error.
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        counts = [cell.execution_count for cell in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: run it in order"
        for cell in code:
            assert all(o.output_type != "error" for o in cell.outputs), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    flags = f"{os.environ.get('XLA_FLAGS', '')} {EXTRA_FLAGS.get(path.stem, '')}"
    env = dict(os.environ, GQDIFFRAX_NOTEBOOK_SMALL="1", XLA_FLAGS=flags.strip())
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT,
        # Run in a scratch directory, so that anything a notebook writes stays out of
        # the working tree.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)
