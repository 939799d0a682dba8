"""QAT and sparse fine-tuning with Hugging Face ``transformers.Trainer``.

Prepare the model first, then add the callback; it keeps 2:4 masks fixed, counts steps for
range freezing, writes the quantizer state into every ``checkpoint-N`` folder and restores it
when training resumes from one.

Example::

    model = prepare_qat(model, "int4_weight_only_sym", qat=QATConfig(freeze_after=500))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[QATCallback()])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
    model = convert(trainer.model)
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from ..qat import after_optimizer_step, before_optimizer_step, load_qat_state, save_qat_state

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"


class QATCallback(TrainerCallback):
    """Trainer callback: mask keeping, range freezing, quantizer state in checkpoints.

    ``resume_from``: the checkpoint folder to restore quantizer state from when training does
    not start at step 0; by default ``<output_dir>/checkpoint-<global_step>``.
    """

    def __init__(self, resume_from: str | os.PathLike | None = None):
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            return
        folder = self.resume_from or os.path.join(
            args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if load_qat_state(model, folder):
            logger.info("restored quantizer state from %s", folder)
        else:
            logger.warning("resuming at step %d but %s holds no quantizer state; quantizer "
                           "ranges start from the model as prepared", state.global_step, folder)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        before_optimizer_step(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        after_optimizer_step(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        save_qat_state(model, folder)
