"""Read what a run saved: ``decomposition/{stage}-epoch{N}.json``, its per-image ``-samples.pt``, config.yaml.

The JSON holds the attack ``settings``, ``eps_curve``, ``latent_dim``, ``input_shape``, the logged
``summary`` and, in newer runs, ``arms`` (attack arms with records; ``["full", "on", "off"]`` when absent),
``seed``, ``num_images`` and ``model_checks`` (checks the evaluation ran before attacking). The samples file
is a dict of 1-D tensors, one row per attacked image: ``correct``, ``{arm}_success``, ``{arm}_l2``,
``{arm}_linf``, ``on_fraction``, ``random_fraction`` and optional further columns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from dmm.errors import DmmError

DEFAULT_ARMS = ("full", "on", "off")
ARM_LABELS = {
    "full": "unconstrained",
    "on": "on-manifold (tangent space)",
    "off": "off-manifold (its complement)",
    "random": "random k-dim subspace",
    "random_off": "random subspace's complement",
    "support": "random subspace of the image's pixels",
    "support_off": "its complement",
    "other": "tangent space of another image of the class",
    "other_off": "its complement (other image)",
}
REQUIRED_PAYLOAD = ("settings", "eps_curve", "latent_dim", "input_shape", "summary")
REQUIRED_SETTINGS = ("eps", "norm", "steps", "step_size", "clamp")


def arm_label(arm: str) -> str:
    """Readable name of an attack arm; an arm this report does not know keeps its raw name."""
    return ARM_LABELS.get(arm, arm)


@dataclass
class Run:
    """One run folder's decomposition results and the files they came from."""

    folder: Path
    label: str
    json_path: Path
    payload: dict
    records: dict[str, Tensor]
    config: dict

    @property
    def arms(self) -> list[str]:
        return list(self.payload.get("arms") or DEFAULT_ARMS)

    @property
    def settings(self) -> dict:
        return self.payload["settings"]

    @property
    def seed(self) -> int | None:
        """The evaluation's seed (image subset, random subspaces): saved in the JSON, else in config.yaml."""
        seed = self.payload.get("seed", (self.config.get("decomposition") or {}).get("seed"))
        return None if seed is None else int(seed)


def _command_hint(folder: Path, stage: str) -> str:
    command = "test" if stage == "test" else "validate"
    return (
        f"make them with `dmm {command} --config configs/<dataset>/classifier.yaml --ckpt_path "
        f"{folder}/checkpoints/last.ckpt --decomposition.autoencoder <autoencoder run>/checkpoints/last.ckpt`"
    )


def _latest_results(folder: Path, stage: str) -> Path:
    pattern = re.compile(rf"^{stage}-epoch(\d+)\.json$")
    found = sorted(
        (int(m.group(1)), p) for p in (folder / "decomposition").glob("*.json") if (m := pattern.match(p.name))
    )
    if found:
        return found[-1][1]
    config_text = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    if re.search(r"class_path: \S*Autoencoder", config_text):
        raise DmmError(
            f"{folder} is an autoencoder run: pass it as --decomposition.autoencoder "
            f"{folder}/checkpoints/last.ckpt to `dmm test` and report the classifier's run folder"
        )
    other = "val" if stage == "test" else "test"
    also = (
        f" (it has {other} results: pass --stage {other})"
        if list((folder / "decomposition").glob(f"{other}-epoch*.json"))
        else ""
    )
    raise DmmError(
        f"run folder {folder} has no {stage} decomposition results (decomposition/{stage}-epoch*.json){also}; "
        + _command_hint(folder, stage)
    )


def _malformed(payload: dict, records: dict) -> list[str]:
    """What is missing or inconsistent in a payload and its records (empty when usable)."""
    missing = [k for k in REQUIRED_PAYLOAD if k not in payload]
    if missing:
        return missing
    missing = [f"settings.{k}" for k in REQUIRED_SETTINGS if k not in payload["settings"]]
    arms = payload.get("arms") or DEFAULT_ARMS
    if not all(isinstance(a, str) for a in arms) or "full" not in arms:
        missing.append("arms as a list of names holding 'full'")
    required = ["correct", "on_fraction", "random_fraction"]
    required += [f"{a}_{s}" for a in arms if isinstance(a, str) for s in ("success", "l2", "linf")]
    missing += [k for k in required if k not in records]
    if not missing and len({records[k].shape for k in required} | {records["correct"].shape}) != 1:
        missing.append("per-image tensors of equal shapes")
    if not missing and (records["correct"].dim() != 1 or records["correct"].numel() == 0):
        missing.append("1-D per-image tensors of at least one image")
    return missing


def load_run(folder: str | Path, stage: str) -> Run:
    """Read the latest ``{stage}`` decomposition of a run folder.

    Raises:
        DmmError: no folder, no results of that stage, or results that are truncated or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DmmError(f"run folder {folder} not found")
    json_path = _latest_results(folder, stage)
    samples_path = json_path.with_name(json_path.stem + "-samples.pt")
    try:
        payload = json.loads(json_path.read_text())
        records = torch.load(samples_path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise DmmError(
            f"{samples_path} is missing (it is written beside {json_path.name}); " + _command_hint(folder, stage)
        ) from None
    except Exception as error:  # json and torch raise many types for truncated or foreign files
        raise DmmError(
            f"cannot read {json_path} or its samples file ({type(error).__name__}: {error}); "
            + _command_hint(folder, stage)
        ) from None
    if not isinstance(payload, dict) or not isinstance(records, dict):
        raise DmmError(f"{json_path} or its samples file is not a dict; " + _command_hint(folder, stage))
    if problems := _malformed(payload, records):
        raise DmmError(
            f"{json_path} or its samples file is malformed (missing {problems}); " + _command_hint(folder, stage)
        )
    config_path = folder / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    except yaml.YAMLError as error:
        raise DmmError(f"{config_path} is not valid YAML ({error}); it is the config `dmm` saved for the run") from None
    return Run(folder, folder.name, json_path, payload, records, config or {})


def unique_labels(runs: list[Run]) -> None:
    """Number runs whose folders share a name (``a-1``, ``a-2``) so labels and file names stay unique."""
    labels = [run.label for run in runs]
    for i, run in enumerate(runs):
        if labels.count(run.label) > 1:
            run.label = f"{run.label}-{labels[:i].count(run.label) + 1}"
