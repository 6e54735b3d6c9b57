"""Where a run's figures came from: its dataset, classifier and autoencoder (types, checkpoint, MSE).

Nothing here is required: a fact that cannot be found (a moved checkpoint, a run without config.yaml)
is "n/a" and the report goes on.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from dmm.models.loading import migrate_autoencoder, migrate_classifier
from dmm.report.runs import Run


def _origins(run: Run) -> list[Path]:
    """Folders that relative paths in the run's config may be relative to, most likely first.

    The CLI writes paths relative to the directory it ran in; when ``trainer.default_root_dir`` is
    relative and the run folder ends with it, that directory is known exactly.
    """
    bases = []
    root = ((run.config.get("trainer") or {}).get("default_root_dir")) or ""
    parts, resolved = Path(root).parts, run.folder.resolve().parts
    if root and not Path(root).is_absolute() and ".." not in parts and resolved[-len(parts) :] == parts:
        bases.append(Path(*resolved[: -len(parts)]))
    return bases + [Path.cwd(), *run.folder.resolve().parents]


def resolve(path: str | None, run: Run) -> Path | None:
    """An existing file a run's recorded (maybe relative) path points to, or None."""
    if not path:
        return None
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [base / p for base in _origins(run)]
    return next((c for c in candidates if c.exists()), None)


def class_name(spec) -> str:
    """``dmm.nets.MLP`` -> ``MLP`` for a class_path dict or string; "n/a" when absent."""
    path = spec.get("class_path") if isinstance(spec, dict) else spec
    return str(path).rsplit(".", 1)[-1] if path else "n/a"


def _float(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def classifier_facts(run: Run) -> dict:
    """Class and network of the classifier (config.yaml), the checkpoint the evaluation loaded and how that
    checkpoint was trained: its adversarial-training attack (``adversary``, None for standard training; "n/a"
    when the checkpoint cannot be read), so a standard and a robust classifier never count as seeds of one
    experiment."""
    spec = run.config.get("model") or {}
    facts = {
        "class": class_name(spec),
        "network": class_name((spec.get("init_args") or {}).get("network")),
        "checkpoint": run.config.get("ckpt_path"),
        "adversary": "n/a",
    }
    path = resolve(facts["checkpoint"], run)
    if path is not None:
        try:
            hp = torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        except Exception:  # replaced or truncated since the run: the report goes on without the fact
            return facts
        facts["adversary"] = migrate_classifier(dict(hp)).get("adversary")
    return facts


def _recorded_mse(checkpoint: dict, path: Path) -> tuple[float | None, str]:
    """The autoencoder's reconstruction MSE and where it was found; (None, "n/a") when nowhere."""
    # 1) the monitored MSE when this very checkpoint was written (ModelCheckpoint state).
    for state in (checkpoint.get("callbacks") or {}).values():
        monitor = str(state.get("monitor") if isinstance(state, dict) else "")
        if "mse" in monitor and _float(state.get("current_score")) is not None:
            return _float(state["current_score"]), f"{monitor} at this checkpoint"
    # 2) the last logged test/val MSE of the autoencoder's run folder (metrics.csv, then W&B summary).
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    for key in ("test/mse", "val/mse"):
        if (folder / "metrics.csv").is_file():
            with open(folder / "metrics.csv", newline="") as f:
                values = [_float(row.get(key)) for row in csv.DictReader(f)]
            if values := [v for v in values if v is not None]:
                return values[-1], f"last {key} in {folder.name}/metrics.csv"
        for summary in sorted(folder.glob("wandb/*/files/wandb-summary.json")):
            if (value := _float(json.loads(summary.read_text()).get(key))) is not None:
                return value, f"{key} in the W&B summary of {folder.name}"
    return None, "n/a"


def autoencoder_facts(run: Run) -> dict:
    """Types, latent size and reconstruction MSE of the run's autoencoder ("n/a" where not found)."""
    path = resolve(run.payload.get("autoencoder"), run)
    facts = {
        "checkpoint": run.payload.get("autoencoder"),
        "class": "n/a",
        "encoder": "n/a",
        "decoder": "n/a",
        "latent_dim": run.payload["latent_dim"],
        "extra": {},
        "mse": None,
        "mse_source": "n/a (autoencoder checkpoint not found)",
    }
    if run.payload.get("autoencoder") == "data":  # --evaluation.autoencoder data: no checkpoint, no learned model
        exact = {"class": "exact (data module)", "encoder": "ExactEncoder", "decoder": "the data's generator"}
        return facts | exact | {"mse_source": "n/a (exact manifold of the data module)"}
    if path is None:
        return facts
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # replaced or truncated since the run: the report goes on without its facts
        facts["mse_source"] = f"n/a (cannot read {path}: {type(error).__name__})"
        return facts
    # Old isometric subclasses read as today's Autoencoder with its regulariser, so old and new runs compare.
    hp = migrate_autoencoder(dict(checkpoint.get("hyper_parameters", {})))
    facts.update(checkpoint=str(path), **{k: class_name(hp.get(k)) for k in ("encoder", "decoder")})
    facts["class"] = class_name(hp.get("_class_path"))
    regularizer = hp.get("regularizer")
    if isinstance(regularizer, dict):
        facts["class"] += f" + {class_name(regularizer)}"
    known = {"encoder", "decoder", "input_shape", "latent_dim", "num_classes", "geometry_samples"}
    known |= {"optimizer", "scheduler"}
    facts["extra"] = {
        k: v
        for k, v in {**hp, **((regularizer or {}).get("init_args") or {})}.items()
        if k not in known and not k.startswith("_") and isinstance(v, (int, float, str, bool))
    }
    facts["mse"], facts["mse_source"] = _recorded_mse(checkpoint, path)
    return facts
