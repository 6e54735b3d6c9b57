"""The ``dmm`` command: a LightningCLI that links data facts into models and gives every run its folder.

Every run (fit, validate, test, predict) writes into its own folder ``<root>/<run name>/``: the resolved
``config.yaml``, ``checkpoints/`` (best and last) and ``wandb/`` (whose run config is the same resolved
config). ``<root>`` is ``trainer.default_root_dir`` (default ``runs``); the name is the SLURM job id on a
cluster (so a requeued job resumes in place) and a timestamp plus random suffix elsewhere, so two runs
never write into the same folder. A run that fails before its first batch ends leaves no folder behind.

Bad input ends as one ``dmm: error:`` line (exit status 2): a bad option or value, a checkpoint path that
is not there, and any exception that a configured class raises while it is built or before its first
batch ends, named by its config key (see :mod:`dmm.errors`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import dmm.data  # noqa: F401  (registers the classes so configs can name them briefly)
import dmm.models  # noqa: F401
from dmm.callbacks import Checkpoint, Evaluation, RNGState
from dmm.errors import TRACEBACK_ENV, ConfigError, DmmError, Owner, blame, config_owners, is_bug, user_error
from dmm.loggers import configure_wandb, finish_wandb, log_config
from dmm.models.loading import check_ckpt_path, migrate_hyperparameters

log = logging.getLogger("dmm")

RUN_DIR_ENV = "DMM_RUN_DIR"  # set by the first process so DDP workers it launches share the folder


def _new_run_dir(root: Path) -> tuple[Path, bool]:
    """The run folder, and whether this process made it (and may remove it if the run never starts)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]), False
    if os.environ.get("SLURM_JOB_ID"):
        name = "slurm-" + os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            name += "-" + os.environ["SLURM_ARRAY_TASK_ID"]
        path = root / name  # shared by every task of the job and by its requeues
        path.mkdir(parents=True, exist_ok=True)
        owned = False
    else:
        while True:
            path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        owned = True
    os.environ[RUN_DIR_ENV] = str(path)
    return path, owned


class DmmArgumentParser(LightningArgumentParser):
    """A parse error is the message and a pointer to ``--help``, without the usage dump of every option."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        command = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"dmm: error: {message.strip()}\nSee `{command} --help` for the options.\n")
        sys.exit(2)

    @classmethod
    def adopt(cls, parser: LightningArgumentParser) -> LightningArgumentParser:
        """The parser, now of this class (Lightning < 2.5 builds its parsers without a ``parser_class``)."""
        if type(parser) is LightningArgumentParser:
            parser.__class__ = cls
        return parser


class SaveConfig(SaveConfigCallback):
    """``config.yaml`` in the run folder, and the same resolved config on the W&B run.

    LightningCLI saves the config to a file only (Lightning issue #19728); on W&B it makes every setting a
    run config key (``trainer.max_epochs``, ``model.init_args.optimizer.init_args.lr``, ``evaluation.num_images``).
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_config(trainer.loggers, yaml.safe_load(self.parser.dump(self.config, skip_none=False)))


class FirstBatch(L.Callback):
    """Remembers whether any batch of any stage (sanity check included) has finished."""

    done = False

    def _done(self, *args: Any) -> None:
        self.done = True

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _done


class DmmCLI(LightningCLI):
    """LightningCLI with W&B by default, a checkpoint callback, data facts linked into models, run folders."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # systems own their optimiser arguments
        kwargs.setdefault("parser_kwargs", {"exit_on_error": True, "prog": "dmm"})
        kwargs.setdefault("save_config_callback", SaveConfig)
        kwargs.setdefault("trainer_defaults", {"callbacks": [RNGState()]})
        self.first_batch, self.run_dir, self.stage = FirstBatch(), None, "parse"
        try:
            super().__init__(*args, **kwargs)
            if self.subcommand is not None:
                finish_wandb(exit_code=0)
        except Exception as error:
            try:
                explained = self._explain(error)
            except Exception:  # never hide the real error behind one of ours
                explained = None
            if not self.first_batch.done:
                self._remove_run_dir()
            if explained is None:
                raise
            raise explained from error

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Models that take these parameters get them from the data module; the others ignore the link.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")  # last.ckpt always the latest
        # Every measure runs through this one callback: `--evaluation.autoencoder PATH` turns on the default
        # Decomposition; `--evaluation.measure.attack.eps 2`, or a config's `evaluation.measure: {class_path: ...}`.
        parser.add_lightning_class_args(Evaluation, "evaluation")
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

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return DmmArgumentParser.adopt(super().init_parser(**kwargs))

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):  # before the run folder exists, and before Lightning reads the file
            check_ckpt_path(self.config.subcommand, self.config[self.config.subcommand])

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own (it merges a ``--ckpt_path`` checkpoint's hyperparameters into the model's config),
        with the checkpoint's hyperparameters migrated first, so old checkpoints (isometric autoencoder
        subclasses, the classifier's ``adv_*`` arguments) load: see :mod:`dmm.models.loading`."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams = migrate_hyperparameters(hparams)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir, owned = _new_run_dir(Path(config.trainer.default_root_dir or "runs"))
        self.run_dir = run_dir if owned else None
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
        self.stage = "instantiate"

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(self.first_batch)
        return trainer

    def after_instantiate_classes(self) -> None:
        self.stage = "run"

    def _owners(self) -> list[Owner]:
        """What the user configured, by config key (see :func:`dmm.errors.config_owners`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        groups = {}
        for key, group in self._parser(self.subcommand).groups.items():
            cls = getattr(group, "group_class", None)
            # Once running, every frame under trainer.fit has the Trainer as self: it blames nothing then.
            if cls is not None and key in config and not (self.stage == "run" and issubclass(cls, L.Trainer)):
                groups[key] = cls
        built = None
        if self.stage == "run":
            built = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config_owners(config, groups, built)

    def _explain(self, error: Exception) -> DmmError | None:
        """A one-line error for what the user can fix, or None to keep the traceback."""
        if self.stage == "parse" or _traceback_wanted():
            return None  # a parse error exits before this
        message = user_error(error)
        if message is not None:  # already one line; built by a configured class, it gets its key if it has none
            found = blame(error, self._owners()) if self.stage == "instantiate" and "--" not in str(message) else None
            return None if found is None else DmmError(f"--{found.key} ({found.label}): {message}")
        if isinstance(error, MisconfigurationException):
            found = blame(error, self._owners())
            return ConfigError(found.key if found else "trainer", found.label if found else "Lightning", error)
        if is_bug(error) or self.first_batch.done:
            return None
        found = blame(error, self._owners())
        return None if found is None else ConfigError(found.key, found.label, error)

    def _remove_run_dir(self) -> None:
        """A run that never finished a batch leaves nothing behind (only a folder this process made)."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return
        finish_wandb(exit_code=1)  # its writer would otherwise go on writing into the folder
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if os.environ.get(RUN_DIR_ENV) == str(self.run_dir):
            del os.environ[RUN_DIR_ENV]
        log.info("removed %s: the run failed before its first batch", self.run_dir)


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "0") not in ("", "0")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dmm`` and ``python -m dmm``; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        DmmCLI(args=args)
    except Exception as error:
        cause = user_error(error)
        if cause is None or _traceback_wanted():
            raise
        # The message is the whole story: no traceback, the same status as an argument error.
        sys.stderr.write(f"dmm: error: {cause}\n")
        sys.exit(2)
