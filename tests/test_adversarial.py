"""Adversarial training: synthetic data (relabelled adversarial examples: tests/test_relabelled.py)."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import fit

from dmm.attacks import PGD
from dmm.data import SyntheticManifoldDataModule
from dmm.errors import DmmError
from dmm.models import Classifier
from dmm.nets import MLP

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# "1" would parse as the float 1.0, which Lightning reads as 100 % of the batches; "2" means two batches.
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every PGD attack record the batch size it is called with."""
    calls: list[int] = []
    call = PGD.__call__

    def wrapper(self, model, x, *args, **kwargs):
        calls.append(len(x))
        return call(self, model, x, *args, **kwargs)

    monkeypatch.setattr(PGD, "__call__", wrapper)
    return calls


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine a second one makes these small nets 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- adversarial training ----------------------------------------------------------------------------


def test_adversarial_training_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting(monkeypatch)
    csv_logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s"}}'
    args = [*SHORT, "--trainer.logger", csv_logger % (tmp_path / "csv"), "--trainer.enable_progress_bar", "false"]
    args += ["--model.init_args.adv_fraction", "0.5", "--data.batch_size", "32"]
    checkpoint = fit(CONFIGS / "synthetic" / "classifier_adv.yaml", tmp_path / "runs", *args)
    assert calls == [16, 16]  # half of each of the 2 training batches; validation stays clean
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    adv_acc = [float(row["train/adv_acc"]) for row in rows if row.get("train/adv_acc")]
    assert len(adv_acc) == 1 and 0 <= adv_acc[0] <= 1
    model = Classifier.load_from_checkpoint(checkpoint, weights_only=True)
    assert model.adversary == PGD(eps=2.0, steps=7, random_start=True) and model.hparams.adv_fraction == 0.5
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)


def _robustness(adv_eps: float, eps: float) -> tuple[float, float]:
    adversary = PGD(eps=adv_eps, steps=5, random_start=True) if adv_eps > 0 else None
    """Clean and PGD-robust val accuracy (L2, ``eps``) after 4 seeded epochs on 1024 synthetic images."""
    L.seed_everything(0, verbose=False)
    data = SyntheticManifoldDataModule(num_train=1024, num_val=256, batch_size=64)
    network = partial(MLP, hidden=[128, 128], dropout=0.0)
    model = Classifier(network=network, input_shape=(1, 16, 16), num_classes=4, adversary=adversary)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    x, y = data.datasets["val"].tensors
    model.eval()
    x_adv = PGD(eps=eps, steps=20)(model, x, y)  # stronger than in training: 20 steps, not 5
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item(), (model(x_adv).argmax(1) == y).float().mean().item()


def test_adversarial_training_raises_robust_accuracy() -> None:
    # Measured with seeds 0-2: standard robust 0.01-0.08, adversarial 0.27-0.30 at clean 0.68-0.72.
    clean_std, robust_std = _robustness(adv_eps=0.0, eps=2.0)
    clean_adv, robust_adv = _robustness(adv_eps=2.0, eps=2.0)
    assert clean_std > 0.8 and robust_std < 0.15
    assert clean_adv > 0.5  # a constant prediction would score 0.25 both clean and robust
    assert robust_adv > robust_std + 0.15


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"adversary": {"eps": -1.0}}, "attack eps"),
        ({"adversary": {"eps": float("nan")}}, "attack eps"),
        ({"adversary": {"norm": "l1"}}, "attack norm"),
        ({"adversary": {"steps": 0}}, "attack steps"),
        ({"adversary": {"step_size": 0.0}}, "attack step_size"),
        ({"adv_fraction": 0.0}, "model.adv_fraction"),
        ({"adv_fraction": 1.5}, "model.adv_fraction"),
        ({"mean": [0.1, 0.2]}, "model.mean has 2 values but the images have 1 channels"),
    ],
)
def test_bad_adversarial_settings_name_their_key(setting: dict, key: str) -> None:
    with pytest.raises(DmmError, match=key):
        Classifier(input_shape=(1, 16, 16), num_classes=4, **setting)
