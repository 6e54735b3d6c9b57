"""A W&B logger that cannot take a run down with it.

W&B is the default logger, but a training run must not depend on a server: without an account or a
network the CLI switches W&B to offline mode before the run starts, and if W&B raises mid-run this logger
warns once, stops calling it, and the run goes on. Metrics are always also written locally by the
``CSVLogger`` that the CLI puts beside it (``<run>/metrics.csv``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def _guarded(method):
    @functools.wraps(method)
    def wrapper(self: ResilientWandbLogger, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # any W&B failure: network, quota, a bug in a wandb release
            self.failed = True
            log.warning("W&B failed (%s: %s); training goes on, metrics go to metrics.csv", type(error).__name__, error)
            return None

    return wrapper


class ResilientWandbLogger(WandbLogger):
    """:class:`~lightning.pytorch.loggers.WandbLogger` whose failures are logged once and then ignored."""

    failed = False

    @rank_zero_only
    @_guarded
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)

    @rank_zero_only
    @_guarded
    def log_hyperparams(self, params: Any) -> None:
        super().log_hyperparams(params)

    @_guarded
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    @_guarded
    def finalize(self, status: str) -> None:
        super().finalize(status)

    def log_to_experiment(self, payload: dict[str, Any]) -> None:
        """``experiment.log(payload)`` for rich media (histograms, tables, images), guarded like the rest."""
        if rank_zero_only.rank == 0:
            _guarded(lambda self: self.experiment.log(payload))(self)
