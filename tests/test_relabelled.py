"""Ilyas et al.'s relabelled adversarial examples: ``dmm predict`` writes them (Relabeller, PredictSplits,
ShardWriter), RelabelledDataModule loads them. Synthetic data; the MNIST configs too when the files are present."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import fit, run

from dmm.attacks import PGD
from dmm.callbacks.shards import ShardWriter
from dmm.data import PredictSplits, RelabelledDataModule, SyntheticManifoldDataModule
from dmm.errors import DmmError
from dmm.models import Classifier, Relabeller, load_classifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
QUIET += ["--trainer.enable_model_summary", "false"]
# "1" would parse as the float 1.0, which Lightning reads as 100 % of the batches; "2" means two batches.
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
ATTACK = PGD(eps=1.0, steps=3, targeted=True)
PREDICT_STEP = Relabeller.predict_step


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


def synthetic(**settings) -> SyntheticManifoldDataModule:
    return SyntheticManifoldDataModule(num_train=96, num_val=32, num_test=40, batch_size=16, **settings)


def relabel(n1: Path, out: Path, batch_size: int = 32, max_images: int | None = None, **settings) -> None:
    """What ``dmm predict --config configs/synthetic/relabel.yaml`` runs, on 96 train and 32 val images."""
    model = Relabeller(str(n1), (1, 16, 16), 4, **{"attack": ATTACK, **settings})
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ShardWriter(str(out))],
    )
    trainer.predict(model, PredictSplits(synthetic(), max_images, batch_size), return_predictions=False)


def counting(monkeypatch: pytest.MonkeyPatch, die_at: int | None = None) -> list[int]:
    """Record the batch size of every ``Relabeller.predict_step``; raise Killed on call number ``die_at``."""
    calls: list[int] = []

    def predict_step(self, batch, batch_idx):
        if len(calls) + 1 == die_at:
            raise Killed
        calls.append(len(batch[0]))
        return PREDICT_STEP(self, batch, batch_idx)

    monkeypatch.setattr(Relabeller, "predict_step", predict_step)
    return calls


class Killed(Exception):
    """Stands for the process being killed mid-generation."""


def test_relabel_writes_a_folder_that_the_data_module_loads(
    n1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    calls = counting(monkeypatch)
    relabel(n1, out)
    assert sum(calls) == 96 + 32  # every train and val image attacked once
    assert sorted(p.name for p in out.iterdir()) == ["complete.json", "provenance.json", "train.pt", "val.pt"]
    record = json.loads((out / "complete.json").read_text())
    assert record["rows"] == {"train": 96, "val": 32} and record["target"] == "next"

    clean = synthetic()
    clean.setup()
    rows = torch.load(out / "train.pt", weights_only=True)
    clean_x, clean_y = clean.datasets["train"].tensors
    assert torch.equal(rows["label"], clean_y)
    assert torch.equal(rows["y"], (clean_y + 1) % 4)  # the "next" rule, never the true label
    x = rows["x"]
    assert x.shape == clean_x.shape and x.min() >= 0 and x.max() <= 1
    assert torch.linalg.vector_norm((x - clean_x).flatten(1), dim=1).max() <= 1.0 + 1e-5
    assert (x != clean_x).any()
    with torch.no_grad():  # N1 on x agrees with the success flags and the reported rate
        assert torch.equal(load_classifier(n1)(x).argmax(1) == rows["y"], rows["success"])
    assert record["rates"]["train"]["success"] == pytest.approx(rows["success"].float().mean().item())

    module = RelabelledDataModule(str(out), synthetic())
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="dmm.data.relabelled"):
        module.setup("fit")
    Relabeller(str(n1))  # building N1 draws initial weights, under a forked RNG
    assert torch.equal(torch.get_rng_state(), rng)  # N2 trains alike whatever made or loaded the folder
    assert "targeted success rate" in caplog.text
    assert module.success_rate["train"] == pytest.approx(record["rates"]["train"]["success"])
    assert torch.equal(module.datasets["train"].tensors[0], x)
    assert torch.equal(next(iter(module.val_dataloader()))[1], (clean.datasets["val"].tensors[1] + 1) % 4)
    test_x, test_y = next(iter(module.test_dataloader()))  # the wrapped module's CLEAN test split, true labels
    assert torch.equal(test_x, clean.datasets["test"].tensors[0][:16])
    assert torch.equal(test_y, clean.datasets["test"].tensors[1][:16])
    assert torch.equal(next(iter(module.clean_val_dataloader()))[1], clean.datasets["val"].tensors[1][:16])
    shifted = RelabelledDataModule(str(out), synthetic(), test_labels="next")  # the relabelling rule on clean images
    shifted.setup("test")
    assert torch.equal(next(iter(shifted.test_dataloader()))[1], (test_y + 1) % 4)

    relabel(n1, out, batch_size=64)  # complete: nothing is attacked again
    assert sum(calls) == 96 + 32
    with pytest.raises(DmmError, match=r"other settings \(differing: attack\)"):
        relabel(n1, out, attack=ATTACK.replace(eps=0.5))
    with pytest.raises(DmmError, match="was made from .* not from this run's"):  # another manifold
        RelabelledDataModule(str(out), synthetic(seed=1)).setup("fit")


def test_killed_generation_resumes_where_it_stopped(n1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)  # the global RNG plays no part: each run below starts from another state
    relabel(n1, tmp_path / "uninterrupted", batch_size=16)
    counting(monkeypatch, die_at=5)  # batches 1-4 are train rows 0-63; the 5th dies
    with pytest.raises(Killed):
        relabel(n1, tmp_path / "out", batch_size=16)
    assert not (tmp_path / "out" / "complete.json").exists()  # nothing pretends to be whole
    assert len(list((tmp_path / "out" / "pieces").glob("train-*.pt"))) == 4

    calls = counting(monkeypatch)
    relabel(n1, tmp_path / "out", batch_size=32)  # another batch size: pieces are index ranges, not batches
    assert sum(calls) == 32 + 32  # only the train rows 64-95 and the val split were attacked
    assert not (tmp_path / "out" / "pieces").exists()  # the pieces go once the splits are whole
    for split in ("train", "val"):
        expected = torch.load(tmp_path / "uninterrupted" / f"{split}.pt", weights_only=True)
        resumed = torch.load(tmp_path / "out" / f"{split}.pt", weights_only=True)
        assert sorted(resumed) == sorted(expected)
        for key, value in expected.items():
            assert torch.allclose(resumed[key].float(), value.float(), atol=1e-6), (split, key)


def test_killed_before_the_merge_only_merges(n1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "on_predict_end", lambda *args: None)  # every piece written, then killed
        relabel(n1, tmp_path)
    assert len(list((tmp_path / "pieces").glob("*.pt"))) == 4 and not (tmp_path / "complete.json").exists()
    calls = counting(monkeypatch)
    relabel(n1, tmp_path)
    assert calls == [] and json.loads((tmp_path / "complete.json").read_text())["rows"] == {"train": 96, "val": 32}


def test_damaged_piece_is_named(n1: Path, tmp_path: Path) -> None:
    (tmp_path / "pieces").mkdir()
    (tmp_path / "pieces" / "train-0000032-0000064.pt").write_bytes(b"truncated")
    with pytest.raises(DmmError, match=r"train-0000032-0000064\.pt is missing or unreadable.*delete it"):
        relabel(n1, tmp_path)


def test_targets_are_wrong_seeded_varied_and_fixed_by_place(n1: Path) -> None:
    y = torch.arange(400) % 4
    split, index = (torch.arange(400) >= 200).long(), torch.arange(400) % 200
    model = Relabeller(str(n1), target="random")
    t = model.targets(y, split, index)
    assert (t != y).all() and len(set(((t - y) % 4).tolist())) == 3  # every wrong offset occurs, not only "next"
    pieces = [model.targets(y[i : i + 7], split[i : i + 7], index[i : i + 7]) for i in range(0, 400, 7)]
    assert torch.equal(torch.cat(pieces), t)  # no dependence on the batch size
    assert torch.equal(Relabeller(str(n1), target="random").targets(y, split, index), t)
    assert not torch.equal(Relabeller(str(n1), target="random", seed=1).targets(y, split, index), t)
    assert not torch.equal(t[:200], t[200:])  # train and val rows of the same index draw apart
    assert torch.equal(Relabeller(str(n1)).targets(y, split, index), (y + 1) % 4)


@pytest.mark.parametrize("dataset", ["synthetic", "mnist"])
def test_relabel_then_relabelled_configs_through_the_cli(dataset: str, n1: Path, tmp_path: Path, request) -> None:
    """N1, then relabel.yaml (synthetic: stopped after 2 batches, resumed), then relabelled.yaml trains N2, tested."""
    data_dir = []
    if dataset == "mnist":
        mnist = str(request.getfixturevalue("mnist_dir"))
        n1 = fit(CONFIGS / "mnist" / "classifier.yaml", tmp_path / "n1", *SHORT, *QUIET, "--data.data_dir", mnist)
        data_dir = ["--data.init_args.data.init_args.data_dir", mnist]
    out = str(tmp_path / "relabelled")
    predict = ["predict", "--config", str(CONFIGS / dataset / "relabel.yaml"), "--model.init_args.classifier", str(n1)]
    predict += ["--data.init_args.max_images", "64", "--data.init_args.batch_size", "32", *data_dir, *QUIET]
    predict += ["--model.init_args.attack.steps", "2", "--trainer.callbacks.init_args.output_dir", out]
    if dataset == "synthetic":  # (MNIST costs more time: once is enough)
        run(*predict, "--trainer.limit_predict_batches", "2")  # 2 of 4 batches: a run that stops early...
        assert not (tmp_path / "relabelled" / "complete.json").exists()
    run(*predict)  # ...continues when rerun
    record = json.loads((tmp_path / "relabelled" / "complete.json").read_text())
    assert record["rows"] == {"train": 64, "val": 64} and record["attack"]["steps"] == 2

    config = CONFIGS / dataset / "relabelled.yaml"
    n2 = fit(config, tmp_path / "n2", "--data.init_args.path", out, *data_dir, *SHORT, *QUIET)
    # Testing reads only the clean test split: the folder need not be there.
    missing = ["--data.init_args.path", str(tmp_path / "unused"), *data_dir]
    run("test", "--config", str(config), *missing, *QUIET, "--trainer.limit_test_batches", "2", "--ckpt_path", str(n2))
    model = Classifier.load_from_checkpoint(n2, weights_only=True)  # no module object among the hparams
    assert model.hparams.num_classes == (4 if dataset == "synthetic" else 10)


def test_placeholder_paths_are_one_clear_error(capsys) -> None:
    for command, config, says in [
        ("predict", "relabel.yaml", ["dmm fit --config configs/mnist/classifier.yaml", "--model.init_args.classifier"]),
        ("fit", "relabelled.yaml", ["dmm predict --config configs/<dataset>/relabel.yaml", "relabelled/synthetic"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(command, "--config", str(CONFIGS / "synthetic" / config), *SHORT, *QUIET)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(text in err for text in says) and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda n1: Relabeller(n1, attack=PGD(targeted=False)), "--model.init_args.attack"),
        (lambda n1: Relabeller(n1, attack=PGD(targeted=True, random_start=True)), "--model.init_args.attack"),
        (lambda n1: Relabeller(n1, target="previous"), "--model.init_args.target"),
        (lambda n1: PredictSplits(synthetic(), max_images=0), "max_images"),
        (lambda n1: RelabelledDataModule("out", synthetic(), test_labels="previous"), "--data.init_args.test_labels"),
        (lambda n1: RelabelledDataModule("out", synthetic(), batch_size=0), "--data.init_args.batch_size"),
    ],
)
def test_bad_relabelling_settings_name_their_key(build, key: str, n1: Path) -> None:
    with pytest.raises(DmmError, match=key):
        build(str(n1))


def test_unusable_classifiers_and_data_are_refused(n1: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(DmmError, match="cannot load classifier checkpoint") as error:
        Relabeller(str(corrupt))
    assert "dmm fit --config configs/mnist/classifier.yaml" in str(error.value)
    with pytest.raises(DmmError, match=r"takes \(1, 16, 16\) images and 4 classes, not \(1, 12, 12\)"):
        Relabeller(str(n1), (1, 12, 12), 4)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[ShardWriter(str(tmp_path))])
    with pytest.raises(DmmError, match="ShardWriter writes what PredictSplits feeds"):
        trainer.predict(Relabeller(str(n1)), synthetic())


def test_the_data_layer_imports_no_system() -> None:
    systems = ("dmm.models", "dmm.attacks", "dmm.callbacks", "dmm.cli")
    for file in (ROOT / "dmm" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not [n for n in names if n.startswith(systems)], f"{file.name} imports {names}"
