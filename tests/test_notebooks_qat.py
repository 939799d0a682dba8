"""Execute calib/notebooks/qat.ipynb at reduced size (Fashion-MNIST subset, a few QAT steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from notebooks import require, run_notebook

DATA = Path("/usr/share/datasets/fashion-mnist")
SMALL = """DATA = {data!r}
N_TRAIN = 1024
FP_EPOCHS = 1
QAT_STEPS = 4
OUT = {out!r}
"""


def test_qat_notebook_runs_at_reduced_size(tmp_path):
    require()
    if not (DATA / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    outputs = run_notebook("qat.ipynb", SMALL.format(data=str(DATA), out=str(tmp_path / "ckpt")),
                           tmp_path, timeout=600)
    for name in ("fp", "ptq_int8", "ptq_int4", "qat_int4"):
        assert f"\n{name} " in outputs or outputs.startswith(f"{name} ")
    assert "(same: True )" in outputs
    assert (tmp_path / "ckpt" / "modelopt_lite.json").exists()
