"""The ``dmm`` command: a LightningCLI that links data facts into models and gives every run its folder.

Every run (fit, validate, test, predict) writes into its own folder ``<root>/<run name>/``: the resolved
``config.yaml``, ``checkpoints/`` (best and last) and ``wandb/``. ``<root>`` is ``trainer.default_root_dir``
(default ``runs``); the name is the SLURM job id on a cluster (so a requeued job resumes in place) and a
timestamp plus random suffix elsewhere, so two runs never write into the same folder.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import dmm.data  # noqa: F401  (registers the classes so configs can name them briefly)
import dmm.models  # noqa: F401
from dmm.callbacks import Checkpoint, ManifoldDecomposition, RNGState
from dmm.errors import DmmError

log = logging.getLogger("dmm")

RUN_DIR_ENV = "DMM_RUN_DIR"  # set by the first process so DDP workers it launches share the folder


def _new_run_dir(root: Path) -> Path:
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if os.environ.get("SLURM_JOB_ID"):
        name = "slurm-" + os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            name += "-" + os.environ["SLURM_ARRAY_TASK_ID"]
        path = root / name  # shared by every task of the job and by its requeues
        path.mkdir(parents=True, exist_ok=True)
    else:
        while True:
            path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
    os.environ[RUN_DIR_ENV] = str(path)
    return path


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


class DmmCLI(LightningCLI):
    """LightningCLI with W&B by default, a checkpoint callback, data facts linked into models, run folders."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # systems own their optimiser arguments
        kwargs.setdefault("parser_kwargs", {"exit_on_error": True})
        kwargs.setdefault("trainer_defaults", {"callbacks": [RNGState()]})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Models that take these parameters get them from the data module; the others ignore the link.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")  # last.ckpt always the latest
        # Off until `--decomposition.autoencoder PATH` is given; short keys such as --decomposition.eps.
        parser.add_lightning_class_args(ManifoldDecomposition, "decomposition")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
                # W&B, plus metrics.csv in the run folder whatever happens to W&B.
                "trainer.logger": [
                    {"class_path": "dmm.loggers.ResilientWandbLogger", "init_args": {"project": "dmm"}},
                    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}},
                ],
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = _new_run_dir(Path(config.trainer.default_root_dir or "runs"))
        if (run_dir / "config.yaml").is_file():
            # Only a requeued SLURM job comes back to a run folder; anything else there is another command's run.
            if int(os.environ.get("SLURM_RESTART_COUNT", "0")) < 1:
                raise DmmError(
                    f"{run_dir} already holds a run: run one dmm command per SLURM job, "
                    "or give each command its own folder with DMM_RUN_DIR=runs/<name>"
                )
            self.save_config_kwargs["overwrite"] = True
        config.trainer.default_root_dir = str(run_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir / "checkpoints")
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            class_path = getattr(logger, "class_path", "")
            if class_path.endswith("WandbLogger"):
                if logger.init_args.name is None:
                    logger.init_args.name = run_dir.name
                configure_wandb(run_dir)
            elif class_path.endswith("CSVLogger"):  # metrics.csv directly in the run folder
                logger.init_args.name, logger.init_args.version = "", ""
            if class_path and getattr(logger.init_args, "save_dir", None) in (None, "."):
                logger.init_args.save_dir = str(run_dir)
        log.info("run folder: %s", run_dir)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dmm`` and ``python -m dmm``; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        DmmCLI(args=args)
    except Exception as error:
        cause = _user_error(error)
        if cause is None:
            raise
        # The message is the whole story: no traceback, the same status as an argument error.
        sys.stderr.write(f"dmm: error: {cause}\n")
        sys.exit(2)


def _user_error(error: BaseException | None) -> DmmError | None:
    """The DmmError behind an exception, also when jsonargparse wrapped it while instantiating a class."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DmmError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
