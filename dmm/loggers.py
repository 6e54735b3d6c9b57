"""W&B that cannot take a run down with it, and that holds the run's whole resolved config.

W&B is the default logger, but a training run must not depend on a server: without an account or a
network the CLI switches W&B to offline mode before the run starts (:func:`configure_wandb`), and if
W&B raises mid-run :class:`ResilientWandbLogger` warns once, stops calling it, and the run goes on.
Metrics are always also written locally by the ``CSVLogger`` that the CLI puts beside it
(``<run>/metrics.csv``).

LightningCLI writes the resolved config to ``config.yaml`` only; :func:`log_config` puts the same
config on the W&B run (``trainer.max_epochs``, ``model.init_args.optimizer.init_args.lr``, …), so runs
and sweeps can be grouped and filtered by any setting.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def _wandb_reachable(timeout: float = 3.0) -> bool:
    """A W&B key is configured and the server accepts a TCP connection within ``timeout`` seconds."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def configure_wandb(run_dir: Path) -> None:
    """Go offline by ourselves when W&B has no account or no network: never a login prompt, never a hang."""
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
    if os.environ.get("WANDB_MODE"):
        return
    if not _wandb_reachable():
        os.environ["WANDB_MODE"] = "offline"
        log.warning(
            "W&B: no API key or no network, logging offline to %s/wandb. "
            "Upload later with: wandb sync %s/wandb/offline-run-*",
            run_dir,
            run_dir,
        )


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
    """:class:`~lightning.pytorch.loggers.WandbLogger` whose failures are logged once and then ignored.

    Once :meth:`log_config` has put the CLI's config on the run, the flat system hyperparameters that
    Lightning logs next keep off its top-level keys (a data module's ``data`` argument would replace the
    config's whole ``data`` section otherwise); the config holds them all under ``model.init_args``.
    """

    failed = False
    _config_keys: frozenset[str] = frozenset()

    @rank_zero_only
    @_guarded
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)

    @rank_zero_only
    @_guarded
    def log_hyperparams(self, params: Any) -> None:
        params = params if isinstance(params, dict) else vars(params)
        super().log_hyperparams({k: v for k, v in params.items() if k not in self._config_keys})

    @rank_zero_only
    @_guarded
    def log_config(self, config: dict[str, Any]) -> None:
        """Put the resolved CLI config (nested: ``trainer``, ``model``, ``data``, callbacks' keys) on the run."""
        self.experiment.config.update(config, allow_val_change=True)
        self._config_keys = frozenset(config)

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


def log_config(loggers: Iterable[Logger], config: dict[str, Any]) -> None:
    """Put ``config`` on every W&B run among ``loggers`` (other loggers already have ``config.yaml``)."""
    for logger in loggers:
        if isinstance(logger, ResilientWandbLogger):
            logger.log_config(config)
        elif isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:  # a plain one, configured by hand
            logger.experiment.config.update(config, allow_val_change=True)


def finish_wandb(exit_code: int) -> None:
    """End the process's W&B run, if one was started, so that its files are complete and closed.

    Lightning leaves it open until the process exits, and a ``WandbLogger`` made later in the same process
    (a second ``dmm.cli.main`` call) would log into it.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=exit_code)
        except Exception as error:  # as for every W&B call: never what stops a run
            log.warning("W&B failed to finish (%s: %s)", type(error).__name__, error)
