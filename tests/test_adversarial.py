"""Adversarial training and Ilyas et al.'s relabelled adversarial examples: synthetic data, real MNIST if present."""

from __future__ import annotations

import csv
import logging
import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

import dmm.data.relabelled as relabelled
import dmm.models.classifier as classifier_module
from dmm.attacks import pgd
from dmm.cli import main
from dmm.data import RelabelledAdversarialDataModule, SyntheticManifoldDataModule
from dmm.errors import DmmError
from dmm.models import Classifier
from dmm.models.classifier import load_classifier
from dmm.nets import MLP

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]
# "1" would parse as the float 1.0, which Lightning reads as 100 % of the batches; "2" means two batches.
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]


def run(*args: str) -> None:
    os.environ.pop("DMM_RUN_DIR", None)
    main(list(args))
    os.environ.pop("DMM_RUN_DIR", None)


def fit(config: Path, root: Path, *args: str) -> Path:
    """``dmm fit`` in a fresh folder under ``root``; returns its last checkpoint."""
    run("fit", "--config", str(config), "--trainer.default_root_dir", str(root), *args)
    (checkpoint,) = root.glob("*/checkpoints/last.ckpt")
    return checkpoint


def counting(monkeypatch: pytest.MonkeyPatch, module) -> list[int]:
    """Replace ``module.pgd`` by a wrapper that records the batch size of every call."""
    calls: list[int] = []

    def wrapper(model, x, *args, **kwargs):
        calls.append(len(x))
        return pgd(model, x, *args, **kwargs)

    monkeypatch.setattr(module, "pgd", wrapper)
    return calls


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine a second one makes these small nets 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def n1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N1: configs/synthetic/classifier.yaml trained for 3 epochs on 512 images (16x16, 4 classes)."""
    root = tmp_path_factory.mktemp("n1")
    args = ["--data.num_train", "512", "--trainer.max_epochs", "3", "--trainer.limit_val_batches", "2", *QUIET]
    return fit(CONFIGS / "synthetic" / "classifier.yaml", root, *args)


# --- adversarial training ----------------------------------------------------------------------------


def test_adversarial_training_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting(monkeypatch, classifier_module)
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
    assert model.hparams.adv_eps == 2.0 and model.hparams.adv_fraction == 0.5
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)


def _robustness(adv_eps: float, eps: float) -> tuple[float, float]:
    """Clean and PGD-robust val accuracy (L2, ``eps``) after 4 seeded epochs on 1024 synthetic images."""
    L.seed_everything(0, verbose=False)
    data = SyntheticManifoldDataModule(num_train=1024, num_val=256, batch_size=64)
    network = partial(MLP, hidden=[128, 128], dropout=0.0)
    model = Classifier(network=network, input_shape=(1, 16, 16), num_classes=4, adv_eps=adv_eps, adv_steps=5)
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
    x_adv = pgd(model, x, y, eps=eps, steps=20)  # stronger than in training: 20 steps, not 5
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
        ({"adv_eps": -1.0}, "--model.init_args.adv_eps"),
        ({"adv_eps": float("nan")}, "--model.init_args.adv_eps"),
        ({"adv_norm": "l1"}, "--model.init_args.adv_norm"),
        ({"adv_steps": 0}, "--model.init_args.adv_steps"),
        ({"adv_step_size": 0.0}, "--model.init_args.adv_step_size"),
        ({"adv_fraction": 0.0}, "--model.init_args.adv_fraction"),
        ({"adv_fraction": 1.5}, "--model.init_args.adv_fraction"),
    ],
)
def test_bad_adversarial_settings_name_their_key(setting: dict, key: str) -> None:
    with pytest.raises(DmmError, match=key):
        Classifier(input_shape=(1, 16, 16), num_classes=4, **setting)


# --- relabelled adversarial examples -----------------------------------------------------------------


def relabelled_module(n1: Path, tmp_path: Path, **settings) -> RelabelledAdversarialDataModule:
    data = SyntheticManifoldDataModule(num_train=96, num_val=32, num_test=40, batch_size=16)
    settings = {"eps": 1.0, "steps": 3, "batch_size": 32, "cache_dir": str(tmp_path / "cache"), **settings}
    return RelabelledAdversarialDataModule(data, str(n1), **settings)


def test_relabelled_generates_caches_and_regenerates(
    n1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = counting(monkeypatch, relabelled)
    first = relabelled_module(n1, tmp_path)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="dmm.data.relabelled"):
        first.prepare_data()
    assert torch.equal(torch.get_rng_state(), rng)  # N2 trains alike whether or not the cache existed
    first.setup("fit")
    assert sum(calls) == 96 + 32  # every train and val image attacked once
    assert "targeted success rate" in caplog.text
    assert set(first.success_rate) == {"train", "val"} and all(0 <= r <= 1 for r in first.success_rate.values())
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache = torch.load(cache_file, weights_only=True)
    clean_x, clean_y = first.data.datasets["train"].tensors
    assert torch.equal(cache["train_label"], clean_y)
    assert torch.equal(cache["train_y"], (clean_y + 1) % 4)  # the "next" rule, never the true label
    assert torch.equal(first.datasets["train"].tensors[1], cache["train_y"])
    x = first.datasets["train"].tensors[0]
    assert x.shape == clean_x.shape and x.min() >= 0 and x.max() <= 1
    assert torch.linalg.vector_norm((x - clean_x).flatten(1), dim=1).max() <= 1.0 + 1e-5
    assert (x != clean_x).any()
    # N1 on x agrees with the reported success rate.
    model = load_classifier(n1, (1, 16, 16), 4)
    with torch.no_grad():
        hits = (model(x).argmax(1) == cache["train_y"]).float().mean().item()
    assert hits == pytest.approx(first.success_rate["train"])

    again = relabelled_module(n1, tmp_path)
    again.prepare_data()
    again.setup("fit")
    assert sum(calls) == 96 + 32  # the cache was reused: no attack
    assert torch.equal(again.datasets["train"].tensors[0], x)

    changed = relabelled_module(n1, tmp_path, eps=0.5)
    changed.prepare_data()
    assert sum(calls) == 2 * (96 + 32) and len(list((tmp_path / "cache").glob("*.pt"))) == 2

    changed.setup("test")  # test is the wrapped module's CLEAN test split with true labels
    test_x, test_y = next(iter(changed.test_dataloader()))
    assert torch.equal(test_x, first.data.datasets["test"].tensors[0][:16])
    assert torch.equal(test_y, first.data.datasets["test"].tensors[1][:16])
    clean_val = next(iter(changed.clean_val_dataloader()))[1]
    assert torch.equal(clean_val, first.data.datasets["val"].tensors[1][:16])

    shifted = relabelled_module(n1, tmp_path, test_labels="next")  # the relabelling rule on clean images
    shifted.setup("test")
    shifted_x, shifted_y = next(iter(shifted.test_dataloader()))
    assert torch.equal(shifted_x, test_x) and torch.equal(shifted_y, (test_y + 1) % 4)


class Killed(Exception):
    """Stands for the process being killed mid-generation."""


def test_killed_generation_resumes_where_it_stopped(n1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relabelled, "SHARD", 32)  # train: 3 pieces of 32 images; val: 1 piece
    reference = relabelled_module(n1, tmp_path / "uninterrupted", batch_size=16)
    reference.prepare_data()
    expected = torch.load(reference.cache_file()[0], weights_only=True)

    calls = counting(monkeypatch, relabelled)
    original = relabelled.pgd

    def dies_on_fifth_batch(*args, **kwargs):
        if len(calls) == 5:  # batches 1-4 finished pieces 1-2 of train; the 5th is mid-piece 3
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(relabelled, "pgd", dies_on_fifth_batch)
    killed = relabelled_module(n1, tmp_path, batch_size=16)
    with pytest.raises(Killed):
        killed.prepare_data()
    path = killed.cache_file()[0]
    assert not path.exists() and not path.with_suffix(".json").exists()  # no cache pretends to be whole
    assert len(list(path.with_suffix(".parts").glob("train-*.pt"))) == 2

    monkeypatch.setattr(relabelled, "pgd", original)
    calls = counting(monkeypatch, relabelled)
    # A different batch size must not matter: pieces are keyed by image ranges, not batches.
    resumed = relabelled_module(n1, tmp_path, batch_size=32)
    assert resumed.cache_file()[0] == path
    resumed.prepare_data()
    assert sum(calls) == 32 + 32  # only the unfinished train piece and the val split were attacked
    cache = torch.load(path, weights_only=True)
    assert sorted(cache) == sorted(expected)
    for key, value in expected.items():
        assert torch.allclose(cache[key].float(), value.float(), atol=1e-6), key
    assert not path.with_suffix(".parts").exists()  # the pieces go once the cache is whole


def test_damaged_piece_is_named(n1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relabelled, "SHARD", 32)
    module = relabelled_module(n1, tmp_path)
    parts = module.cache_file()[0].with_suffix(".parts")
    parts.mkdir(parents=True)
    (parts / "train-0000032-0000064.pt").write_bytes(b"truncated")
    with pytest.raises(DmmError, match=r"train-0000032-0000064\.pt is unreadable.*delete it"):
        module.prepare_data()


def test_random_targets_are_wrong_seeded_and_varied(n1: Path, tmp_path: Path) -> None:
    module = relabelled_module(n1, tmp_path, target="random", steps=1, max_images=64)
    module.prepare_data()
    module.setup("fit")
    cache = torch.load(module.cache_file()[0], weights_only=True)
    target, label = cache["train_y"], cache["train_label"]
    assert len(target) == 64 and len(cache["val_y"]) == 32
    assert (target != label).all() and (cache["val_y"] != cache["val_label"]).all()
    assert len(set(((target - label) % 4).tolist())) == 3  # every wrong offset occurs, not only "next"
    other_seed = relabelled_module(n1, tmp_path, target="random", steps=1, max_images=64, seed=1)
    assert other_seed.cache_file()[0] != module.cache_file()[0]


@pytest.mark.parametrize("dataset", ["synthetic", "mnist"])
def test_relabelled_config_n1_to_n2_through_the_cli(dataset: str, tmp_path: Path, request) -> None:
    """N1 from the dataset's classifier.yaml, then relabelled.yaml trains N2 and tests it on clean images."""
    data_dir = [] if dataset == "synthetic" else ["--data.data_dir", str(request.getfixturevalue("mnist_dir"))]
    n1 = fit(CONFIGS / dataset / "classifier.yaml", tmp_path / "n1", *SHORT, *QUIET, *data_dir)
    wrapped_dir = [
        f"--data.init_args.data.init_args.{a[len('--data.') :]}" if a.startswith("--") else a for a in data_dir
    ]
    relabel = ["--data.init_args.classifier", str(n1), "--data.init_args.max_images", "64"]
    relabel += ["--data.init_args.steps", "2", "--data.init_args.batch_size", "32", *wrapped_dir]
    config = CONFIGS / dataset / "relabelled.yaml"
    n2 = fit(config, tmp_path / "n2", *SHORT, *QUIET, *relabel)
    assert len(list((n1.parent / "relabelled").glob("relabelled-*.pt"))) == 1  # the default cache folder
    # Testing reads only the clean test split: nothing is generated, even with no cache in reach.
    fresh_cache = ["--data.init_args.cache_dir", str(tmp_path / "unused")]
    test = ["--trainer.limit_test_batches", "2", "--ckpt_path", str(n2)]
    run("test", "--config", str(config), *relabel, *fresh_cache, *QUIET, *test)
    assert not (tmp_path / "unused").exists()
    model = Classifier.load_from_checkpoint(n2, weights_only=True)  # no module object among the hparams
    assert model.hparams.num_classes == (4 if dataset == "synthetic" else 10)


def test_placeholder_classifier_path_is_one_clear_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(CONFIGS / "synthetic" / "relabelled.yaml"), *SHORT, *QUIET)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dmm fit --config configs/mnist/classifier.yaml" in err and "--data.init_args.classifier" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"eps": -1.0}, "--data.init_args.eps"),
        ({"step_size": 0.0}, "--data.init_args.step_size"),
        ({"max_images": 0}, "max_images"),
        ({"target": "previous"}, "--data.init_args.target"),
        ({"norm": "l1"}, "--data.init_args.norm"),
        ({"test_labels": "previous"}, "--data.init_args.test_labels"),
    ],
)
def test_bad_relabelling_settings_name_their_key(setting: dict, key: str, n1: Path, tmp_path: Path) -> None:
    with pytest.raises(DmmError, match=key):
        relabelled_module(n1, tmp_path, **setting)


def test_unusable_classifier_checkpoints_are_refused(n1: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(DmmError, match="cannot load classifier checkpoint") as error:
        relabelled_module(corrupt, tmp_path).prepare_data()
    assert "dmm fit --config configs/mnist/classifier.yaml" in str(error.value)
    small = SyntheticManifoldDataModule(image_size=12, num_train=32, num_val=8)
    with pytest.raises(DmmError, match=r"takes \(1, 16, 16\) images and 4 classes, not \(1, 12, 12\)"):
        RelabelledAdversarialDataModule(small, str(n1), cache_dir=str(tmp_path)).prepare_data()
