"""Run a calibration notebook with its 'parameters' cell replaced; return its text output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "calib" / "notebooks"


def require(*packages: str) -> None:
    for pkg in (*packages, "nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")


def run_notebook(name: str, parameters: str, workdir: Path, timeout: int = 1800) -> str:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source = parameters
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def notebook_model(tmp_path: Path, real_model: str) -> str:
    """The model a notebook test runs on: a tiny Llama folder built here (fast, the default),
    or the real embedded model when MODELOPT_LITE_REAL_NOTEBOOKS=1."""
    import os

    if os.environ.get("MODELOPT_LITE_REAL_NOTEBOOKS") == "1":
        return real_model
    from test_eval import word_tokenizer
    from tiny_models import tiny_llama

    folder = tmp_path / "tiny-llama"
    tiny_llama(hidden=64, inter=128).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return str(folder)
