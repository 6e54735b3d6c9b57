"""ModelCheckpoint whose ``last.ckpt`` is always the latest state, as resuming needs."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, but ``save_last=True`` rewrites ``last.ckpt`` at every save point.

    Since Lightning 2.6, ``last.ckpt`` is written only when a top-k checkpoint is saved at the same step,
    so with ``save_top_k=1`` and a monitor it silently stays at the best epoch: a run resumed from it
    repeats the epochs after the best one, and "last" weights are not the last. Here it is also written
    after every validation (or training epoch end, per ``save_on_train_epoch_end``) that did not
    improve. Arguments are ``ModelCheckpoint``'s.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key, so checkpoints written by it (before this class) resume their best scores.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._catch_up_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._catch_up_last(trainer)

    def _catch_up_last(self, trainer: L.Trainer) -> None:
        # Skipped when something was saved at this step already (with it, by Lightning's rule, last.ckpt),
        # and in sanity checks, fast_dev_run and outside fit, as Lightning skips them.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
