"""Execute calib/notebooks/qat.ipynb at reduced size (Fashion-MNIST subset, a few QAT steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "calib" / "notebooks" / "qat.ipynb"
DATA = Path("/usr/share/datasets/fashion-mnist")
SMALL = """DATA = {data!r}
N_TRAIN = 1024
FP_EPOCHS = 1
QAT_STEPS = 4
OUT = {out!r}
"""


def test_qat_notebook_runs_at_reduced_size(tmp_path):
    for pkg in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")
    if not (DATA / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source = SMALL.format(data=str(DATA), out=str(tmp_path / "ckpt"))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    for name in ("fp", "ptq_int8", "ptq_int4", "qat_int4"):
        assert f"\n{name} " in outputs or outputs.startswith(f"{name} ")
    assert "(same: True )" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
