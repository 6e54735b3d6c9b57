"""Load trained systems from ``dmm fit`` checkpoints: weights only, in eval mode, frozen; older checkpoints migrated.

A checkpoint's ``hyper_parameters`` are the system's ``__init__`` arguments (plus LightningCLI's ``_class_path``
and ``_instantiator``). When an argument changes, the migration below rewrites the old form before the
system is built, so checkpoints of earlier runs keep loading with the meaning they were trained with:

* autoencoders saved as ``IsometricAutoencoder`` (``iso_weight``, ``piso_weight``, ``mixup``) or
  ``IRAutoencoder`` (``distortion_weight``, ``eta``) become an :class:`Autoencoder` with an
  :class:`~dmm.models.Isometry` or :class:`~dmm.models.RelaxedDistortion` regulariser (their tensors are the same);
* classifiers saved with ``adv_eps``, ``adv_norm``, ``adv_steps``, ``adv_step_size``, ``adv_random_start``
  get ``adversary``: those settings as a :class:`~dmm.attacks.PGD` dict when ``adv_eps > 0``, else ``None``.

LightningCLI merges a ``--ckpt_path`` checkpoint's hyperparameters into the config before building the model,
so the CLI applies :func:`migrate_hyperparameters` there too.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from jsonargparse import Namespace

from dmm.errors import DmmError
from dmm.models.autoencoder import Autoencoder
from dmm.models.classifier import Classifier
from dmm.nets import Shape

TRAIN_HINT = (
    "train one with `dmm fit --config configs/mnist/classifier.yaml` (configs/<dataset>/classifier.yaml for other "
    "data) and pass its runs/<run>/checkpoints/<best>.ckpt"
)
AUTOENCODER_HINT = (
    "train one with `dmm fit --config configs/<dataset>/autoencoder.yaml` and pass its runs/<run>/checkpoints/last.ckpt"
)

System = TypeVar("System", bound=L.LightningModule)

# Old autoencoder subclass -> (its regulariser today, the hyperparameters that are now the regulariser's).
_REGULARIZED_AUTOENCODERS = {
    "IsometricAutoencoder": ("dmm.models.regularizers.Isometry", ("iso_weight", "piso_weight", "mixup")),
    "IRAutoencoder": ("dmm.models.regularizers.RelaxedDistortion", ("distortion_weight", "eta")),
}
# The Classifier's adversarial-training arguments before ``adversary``, with their old defaults.
_OLD_ADVERSARY = {"adv_eps": 0.0, "adv_norm": "l2", "adv_steps": 7, "adv_step_size": None, "adv_random_start": True}
# Checkpoint entries that only resuming a fit needs.
_TRAINING_STATE = {"optimizer_states", "lr_schedulers", "loops", "callbacks"}


def migrate_autoencoder(hparams: dict[str, Any]) -> dict[str, Any]:
    """An autoencoder checkpoint's hyperparameters in today's form (a copy; today's pass through unchanged)."""
    hparams = dict(hparams)
    name = str(hparams.get("_class_path", "")).rpartition(".")[2]
    for old, (regularizer, keys) in _REGULARIZED_AUTOENCODERS.items():
        # Saved by the CLI, the class path names the subclass; saved from Python, only its arguments show it.
        if name == old or (not name and set(keys) & hparams.keys()):
            init_args = {key: hparams.pop(key) for key in keys if key in hparams}
            hparams["regularizer"] = {"class_path": regularizer, "init_args": init_args}
            if name:
                hparams["_class_path"] = "dmm.models.Autoencoder"
    return hparams


def migrate_classifier(hparams: dict[str, Any]) -> dict[str, Any]:
    """A classifier checkpoint's hyperparameters in today's form (a copy; today's pass through unchanged)."""
    hparams = dict(hparams)
    if _OLD_ADVERSARY.keys() & hparams.keys():
        old = {key.removeprefix("adv_"): hparams.pop(key, default) for key, default in _OLD_ADVERSARY.items()}
        hparams["adversary"] = old if old["eps"] > 0 else None
    return hparams


def migrate_hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """Any dmm system's checkpoint hyperparameters in today's form (each migration touches only its own keys)."""
    return migrate_classifier(migrate_autoencoder(hparams))


def load_autoencoder(path: str | Path, input_shape: Shape | None = None) -> Autoencoder:
    """An :class:`Autoencoder` (plain or regularised) from a ``dmm fit`` checkpoint, weights only, eval mode, frozen.

    Raises:
        DmmError: the file is missing, unreadable, not an autoencoder, or made for other image shapes.
    """
    path = Path(path)
    model = _load(Autoencoder, path, "autoencoder", AUTOENCODER_HINT, migrate_autoencoder)
    if input_shape is not None and tuple(model.input_shape) != tuple(input_shape):
        raise DmmError(
            f"autoencoder checkpoint {path} was trained on images {tuple(model.input_shape)} but the classifier "
            f"takes {tuple(input_shape)}: {AUTOENCODER_HINT} on the classifier's dataset"
        )
    return model.eval().requires_grad_(False)


def load_classifier(path: str | Path, input_shape: Shape | None = None, num_classes: int | None = None) -> Classifier:
    """A :class:`Classifier` from a ``dmm fit`` checkpoint (weights only), in eval mode and frozen.

    Raises:
        DmmError: the file is missing, unreadable, not a classifier, or made for other images or classes.
    """
    path = Path(path)
    model = _load(Classifier, path, "classifier", TRAIN_HINT, migrate_classifier)
    shape, classes = tuple(model.hparams.input_shape), model.hparams.num_classes
    wanted = (tuple(input_shape or shape), num_classes or classes)
    if (shape, classes) != wanted:
        raise DmmError(
            f"classifier checkpoint {path} takes {shape} images and {classes} classes, not {wanted[0]} and "
            f"{wanted[1]}: {TRAIN_HINT} on this dataset"
        )
    return model.eval().requires_grad_(False)


def _load(
    cls: type[System], path: Path, kind: str, hint: str, migrate: Callable[[dict[str, Any]], dict[str, Any]]
) -> System:
    """``cls`` from the checkpoint at ``path``, its hyperparameters migrated; every failure one DmmError."""
    if not path.is_file():
        raise DmmError(f"{kind} checkpoint {path} not found: {hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        hparams = migrate(checkpoint.get("hyper_parameters", {}))
        _check_class(hparams.get("_class_path"), cls, path, kind, hint)
        checkpoint = {k: v for k, v in checkpoint.items() if k not in _TRAINING_STATE} | {"hyper_parameters": hparams}
        buffer = io.BytesIO()  # Lightning builds systems from a file: hand it the migrated checkpoint as one
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        return cls.load_from_checkpoint(buffer, map_location="cpu", weights_only=True)
    except DmmError:
        raise
    except Exception as error:  # torch/pickle raise many types; their first line says what went wrong
        reason = (str(error).strip().splitlines() or [""])[0]
        raise DmmError(f"cannot load {kind} checkpoint {path} ({type(error).__name__}: {reason}); {hint}") from None


def _check_class(class_path: Any, cls: type, path: Path, kind: str, hint: str) -> None:
    """Refuse a checkpoint whose class is not ``cls`` or an imported subclass: e.g. a classifier as autoencoder.

    Like Lightning, this reads ``sys.modules`` only: nothing a checkpoint names is imported.
    """
    if class_path is None:  # saved outside the CLI: Lightning builds ``cls``
        return
    module, _, name = str(class_path).rpartition(".")
    target = getattr(sys.modules.get(module), name, None)
    if not (isinstance(target, type) and issubclass(target, cls)):
        article = "an" if kind[0] in "aeiou" else "a"
        raise DmmError(f"{kind} checkpoint {path} holds a {class_path}, not {article} {kind}: {hint}")


# --- checkpoint paths on the command line -----------------------------------------------------------

CKPT_HINT = (
    "pass a checkpoint file written by `dmm fit` (runs/<run>/checkpoints/best-*.ckpt, or last.ckpt to resume) "
    "or its run folder runs/<run> for that run's best checkpoint"
)


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a ``dmm fit`` run folder (``<run>/checkpoints/best-*.ckpt``)."""
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    candidates = sorted(folder.glob("best-*.ckpt"))
    if len(candidates) > 1 and (folder / "last.ckpt").is_file():  # save_top_k > 1: ask the run which is best
        state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True).get("callbacks", {})
        best = {Path(s.get("best_model_path", "")).name for k, s in state.items() if k.startswith("ModelCheckpoint")}
        candidates = [c for c in candidates if c.name in best] or candidates
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "no best-*.ckpt"
        raise DmmError(f"--ckpt_path {run_dir}: a run folder must hold one best checkpoint, found {found}; {CKPT_HINT}")
    return candidates[0]


def check_ckpt_path(subcommand: str, config: Namespace) -> None:
    """Refuse a checkpoint path Lightning would fail on deep inside a run; a run folder becomes its best file."""
    path = config.get("ckpt_path")
    if path is None or "://" in str(path):  # remote paths are Lightning's to check
        return
    if path in ("best", "last", "hpc", "registry"):
        if subcommand == "fit" and path == "hpc":
            return
        raise DmmError(f"--ckpt_path {path} names a checkpoint of an earlier fit in this same process; {CKPT_HINT}")
    if Path(path).is_dir():
        config.ckpt_path = str(best_checkpoint(Path(path)))
    elif not Path(path).is_file():
        raise DmmError(f"--ckpt_path {path}: no such file; {CKPT_HINT}")
