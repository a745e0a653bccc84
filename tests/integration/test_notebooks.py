"""The tutorial notebooks run end to end, and are committed without outputs.

Each ``notebooks/*.ipynb`` is executed with nbclient in a fresh ipykernel started from this interpreter
(``sys.executable``), with the notebooks folder as the working directory, as Jupyter would. Files the notebooks
write go to a temporary folder (``HALTRACE_NOTEBOOK_OUT``), not into the repository. Each notebook must finish
in 3 minutes of CPU time (the issue's budget); the wall-clock timeout is generous because the test machine is
shared.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED = ["01_trace_and_logit_lens", "02_probes_and_saes", "03_steer_and_evaluate", "04_export_and_deploy",
            "05_explain_one_answer"]
CELL_TIMEOUT_S = 1200  # a hang guard: a loaded 2-core machine runs 5-10x slower than an idle one
CPU_BUDGET_S = 180


def test_the_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; strip them before committing "
                       f"(e.g. jupyter nbconvert --clear-output --inplace {path.name})")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def _kernel_manager():
    """A kernel manager for "python3" that starts ipykernel from this interpreter (``sys.executable``).

    A fresh venv has ipykernel's spec in ``.venv/share/jupyter/kernels``, but a user-level or system spec named
    python3 could point at another Python without haltrace; ipykernel's own spec dict always names this one.
    """
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(resource_dir="", **get_kernel_dict())

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # the kernel inherits this environment: outputs to a temp folder, never to the hub or a package index
    monkeypatch.setenv("HALTRACE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # no debugger warning in the kernel's stderr
    nb = nbformat.read(str(path), as_version=4)
    km = _kernel_manager()
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    started, cpu_before = time.perf_counter(), _children_cpu()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:  # the message holds the failing cell and traceback
        pytest.fail(f"{path.name} failed:\n{err}")
    finally:
        # nbclient leaves a kernel it did not start running: stop it (and reap it, so its CPU time counts)
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=False)
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    print(f"\n{path.name}: {wall:.1f} s wall, {cpu:.1f} s kernel CPU")
    if cpu > 0:  # the kernel has exited and been reaped, so its CPU time is counted
        assert cpu <= CPU_BUDGET_S, f"{path.name} used {cpu:.0f} s of CPU, over the {CPU_BUDGET_S} s budget"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(tmp_path.iterdir()), f"{path.name} wrote nothing under HALTRACE_NOTEBOOK_OUT"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_notebooks_write_outputs_outside_the_repo_by_default():
    """Without HALTRACE_NOTEBOOK_OUT the notebooks write under out/notebooks/, which git ignores."""
    ignore = (NOTEBOOKS_DIR.parent / ".gitignore").read_text().split()
    assert "/out/" in ignore
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        source = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "HALTRACE_NOTEBOOK_OUT" in source and '"out" / "notebooks"' in source, path.name
