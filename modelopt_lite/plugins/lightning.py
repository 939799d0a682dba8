"""QAT and sparse fine-tuning with Lightning (``pip install modelopt-lite[lightning]``).

Prepare the model (or the LightningModule's sub-model) first, then add the callback; it keeps
2:4 masks fixed, counts optimizer steps for range freezing, stores the quantizer state in
Lightning checkpoints and restores it on ``trainer.fit(..., ckpt_path=...)``.

Example::

    module.model = prepare_qat(module.model, "int4_weight_only_sym")
    trainer = lightning.Trainer(max_steps=500, callbacks=[QATCallback()])
    trainer.fit(module, loader)
    convert(module.model)

``lightning`` is imported when the callback class is first used, not with ``modelopt_lite``.
"""

from __future__ import annotations

import functools

from ..qat import (after_optimizer_step, before_optimizer_step, load_qat_state_dict,
                   qat_state_dict)


def __getattr__(name: str):
    if name == "QATCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _callback_class():
    try:
        from lightning.pytorch import Callback
    except ImportError as err:
        raise ImportError("the Lightning plugin needs lightning: pip install lightning "
                          "(or modelopt-lite[lightning])") from err

    class QATCallback(Callback):
        """Lightning callback: mask keeping, range freezing, quantizer state in checkpoints."""

        def __init__(self):
            self._module = None
            self._pending = None
            self._last_step = None

        def setup(self, trainer, pl_module, stage):
            self._module = pl_module

        def on_train_start(self, trainer, pl_module):
            if self._pending is not None:
                load_qat_state_dict(pl_module, *self._pending)
                self._pending = None
            self._last_step = trainer.global_step

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            before_optimizer_step(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != self._last_step:  # an optimizer step happened
                self._last_step = trainer.global_step
                after_optimizer_step(pl_module)

        def state_dict(self):
            if self._module is None:
                return {}
            tensors, meta = qat_state_dict(self._module)
            return {"tensors": tensors, "meta": meta}

        def load_state_dict(self, state_dict):
            if state_dict:
                self._pending = (state_dict["tensors"], state_dict["meta"])

    QATCallback.__qualname__ = "QATCallback"
    QATCallback.__module__ = __name__
    return QATCallback
