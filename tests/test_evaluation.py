"""The evaluation callback through the real CLI: files, seeded subset, logged metrics, W&B media, switches.

Every run is a synthetic config made cheap: a two-step autoencoder, an untrained or two-step classifier, one
batch per stage, a few dozen images and a few attack steps. The figures are not the point; where they go is.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml

from dmm.attacks import PGD
from dmm.callbacks import Evaluation
from dmm.cli import main
from dmm.data import SyntheticManifoldDataModule
from dmm.errors import DmmError
from dmm.loggers import ResilientWandbLogger
from dmm.measures import Decomposition
from dmm.media import titled_grid
from dmm.models.loading import load_autoencoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSIFIER = ["--config", str(CONFIGS / "synthetic" / "classifier.yaml")]
DETECTION = ["--config", str(CONFIGS / "synthetic" / "detection.yaml")]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
NO_LOGGER = ["--trainer.logger=false", *QUIET]
# metrics.csv in the run folder: the CLI points a CSVLogger saving to "." there.
CSV = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=.", *QUIET]
ONE_BATCH = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
DECOMPOSITION_SETTINGS = ["--evaluation.measure.attack.steps=5"]
NUM_IMAGES = 24

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def run(*args: str) -> Path:
    """One `dmm` command; the run folder it made under its --trainer.default_root_dir (the last one given)."""
    os.environ.pop("DMM_RUN_DIR", None)
    root = Path(args[len(args) - 1 - list(reversed(args)).index("--trainer.default_root_dir") + 1])
    before = set(root.glob("*"))
    main(list(args))
    (folder,) = set(root.glob("*")) - before
    return folder


def evaluation(autoencoder: Path | None, *extra: str, num_images: int = NUM_IMAGES) -> list[str]:
    given = ["--evaluation.autoencoder", str(autoencoder)] if autoencoder else []
    return [*given, f"--evaluation.num_images={num_images}", "--evaluation.batch_size=16", *extra]


def metrics(folder: Path) -> dict[str, float]:
    """Every value metrics.csv holds, by column (one row per logging step; the last value of each column)."""
    values = {}
    for row in csv.DictReader((folder / "metrics.csv").open()):
        values |= {key: float(value) for key, value in row.items() if value != ""}
    return values


def same_figures(logged: dict[str, float], summary: dict, prefix: str) -> None:
    """Each summary figure was logged as ``prefix/<key>`` with its value (JSON writes NaN and inf as null)."""
    for key, value in summary.items():
        got = logged[f"{prefix}/{key}"]
        assert (value is None and not math.isfinite(got)) or got == pytest.approx(value, rel=1e-6, abs=1e-7), key


def seeded_subset(split: str, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented subset, ``randperm(len(dataset), seed)[:count]``, and its images, rebuilt from the data."""
    data = SyntheticManifoldDataModule()
    data.setup()
    dataset = data.datasets[split]
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return index, dataset.tensors[0][index]


def test_decomposition_through_fit_validate_and_test(tmp_path: Path, train_synthetic_autoencoder) -> None:
    autoencoder = train_synthetic_autoencoder()
    cache = tmp_path / "fit-cache"
    root = ["--trainer.default_root_dir", str(tmp_path / "clf")]
    settings = evaluation(autoencoder, *DECOMPOSITION_SETTINGS)
    # Two epochs, measured every second one: only after epoch 1, and without a cache.
    fit = run("fit", *CLASSIFIER, *settings, *CSV, *ONE_BATCH, "--trainer.max_epochs=2",
              "--evaluation.every_n_epochs=2", f"--evaluation.cache_dir={cache}", *root)  # fmt: skip
    assert sorted(p.name for p in (fit / "decomposition").iterdir()) == [
        "val-epoch1-samples.pt", "val-epoch1.json", "val-epoch1.png"]  # fmt: skip
    assert not cache.exists()  # weights change during fit: nothing is cached
    checkpoint = fit / "checkpoints" / "last.ckpt"
    validate = run("validate", *CLASSIFIER, *settings, "--evaluation.checks=false", *CSV, *ONE_BATCH,
                   "--ckpt_path", str(checkpoint), *root)  # fmt: skip
    test = run("test", *CLASSIFIER, *settings, *CSV, *ONE_BATCH, "--ckpt_path", str(checkpoint), *root)

    expected_settings = Decomposition(PGD(eps=4.0, steps=5, step_size=0.05, early_stop=True)).settings()
    results = {}
    for stage, folder in (("val", fit), ("val", validate), ("test", test)):
        (written,) = (folder / "decomposition").glob(f"{stage}-epoch*.json")
        result = json.loads(written.read_text())
        results[folder] = result
        assert (result["measure"], result["stage"], result["num_images"]) == ("Decomposition", stage, NUM_IMAGES)
        assert result["settings"] == expected_settings and result["autoencoder"] == str(autoencoder)
        assert (result["latent_dim"], result["input_shape"]) == (4, [1, 16, 16])
        samples = torch.load(written.with_name(written.stem + "-samples.pt"), weights_only=True)
        assert "_images" not in samples and all(v.shape == (NUM_IMAGES,) for v in samples.values())
        # The seeded subset, in order, and the images measured are the dataset's images at those indices.
        index, x = seeded_subset(stage, NUM_IMAGES)
        assert torch.equal(samples["index"], index)
        model = load_autoencoder(autoencoder)
        with torch.no_grad():
            recon_error = (x - model.decoder(model.encoder(x))).flatten(1).norm(dim=1)
        torch.testing.assert_close(samples["recon_error"], recon_error, rtol=1e-5, atol=1e-6)
        assert result["summary"]["num_images"] == NUM_IMAGES
        same_figures(metrics(folder), result["summary"], f"{stage}/decomposition")
        assert (written.with_suffix(".png")).stat().st_size > 0

    # Model checks before the attacks, saved with the results; switched off on request.
    checks = results[test]["model_checks"]
    assert [c["name"] for c in checks] == [
        "model outputs logits, not probabilities", "model is deterministic", "input gradients are not vanishing",
        "iterative attack beats a one-step attack", "white-box attack beats random noise"]  # fmt: skip
    assert all(c["status"] in ("PASS", "WARN") and c["detail"] for c in checks)
    assert checks[0]["status"] == checks[1]["status"] == "PASS"
    assert results[validate]["model_checks"] == []
    # At validate and test the finished batches are cached beside the autoencoder.
    assert [p.name.split("-")[:2] for p in sorted((autoencoder.parent / "cache").iterdir())] == [
        ["decomposition", "test"], ["decomposition", "val"]]  # fmt: skip


def test_detection_measure_through_its_config(tmp_path: Path, train_synthetic_autoencoder) -> None:
    autoencoder = train_synthetic_autoencoder()
    root = ["--trainer.default_root_dir", str(tmp_path / "clf")]
    settings = evaluation(autoencoder, "--evaluation.measure.attack.steps=5")
    fit = run("fit", *DETECTION, *settings, *CSV, *ONE_BATCH, "--trainer.max_epochs=1", *root)
    assert not (fit / "detection").exists()  # the config's during_fit: false
    assert not any("detection" in key for key in metrics(fit))
    test = run("test", *DETECTION, *settings, *CSV, *ONE_BATCH, "--ckpt_path", str(fit / "checkpoints/last.ckpt"),
               *root)  # fmt: skip
    assert sorted(p.name for p in (test / "detection").iterdir()) == ["test-epoch0-samples.pt", "test-epoch0.json"]
    result = json.loads((test / "detection" / "test-epoch0.json").read_text())
    assert result["measure"] == "Detection" and result["eps_curve"] == [0.5, 1.0]
    assert (result["settings"]["eps"], result["settings"]["steps"]) == (1.0, 5)  # the config's, then the command's
    summary = result["summary"]
    assert summary["num_images"] == NUM_IMAGES
    noise_control = {"detect/auroc_recon_noise", "detect/auroc_offmanifold_noise"}
    assert {"ptc/clean_acc", "ptc/robust_acc@1", "classifier/robust_acc@0.5", "detect/auroc_recon"} <= set(summary)
    assert noise_control <= set(summary)
    same_figures(metrics(test), summary, "test/detection")
    samples = torch.load(test / "detection" / "test-epoch0-samples.pt", weights_only=True)
    assert torch.equal(samples["index"], seeded_subset("test", NUM_IMAGES)[0])
    assert len(result["model_checks"]) == 5


def test_detection_config_attack_is_the_one_it_names(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("test", *DETECTION, "--print_config", "--trainer.default_root_dir", "runs")
    assert exit_info.value.code == 0
    measure = yaml.safe_load(capsys.readouterr().out)["evaluation"]["measure"]["init_args"]
    assert measure["attack"] == PGD(eps=1.0, steps=40).as_dict()  # the YAML's fields over PGD's defaults


def test_grid_shows_num_grid_images(tmp_path: Path, train_synthetic_autoencoder) -> None:
    autoencoder = train_synthetic_autoencoder()
    settings = evaluation(autoencoder, *DECOMPOSITION_SETTINGS, "--evaluation.num_grid=2", "--evaluation.batch_size=2",
                          "--evaluation.checks=false", num_images=6)  # fmt: skip
    root = ["--trainer.default_root_dir", str(tmp_path)]
    folder = run("validate", *CLASSIFIER, *settings, *NO_LOGGER, *ONE_BATCH, *root)
    png = matplotlib.image.imread(folder / "decomposition" / "val-epoch0.png")
    columns = {name: torch.zeros(2, 1, 16, 16) for name in Decomposition.image_columns}
    reference = tmp_path / "two-rows.png"
    titled_grid(columns, signed=set(Decomposition.image_columns[2:])).savefig(reference, format="png", dpi=100)
    assert png.shape == matplotlib.image.imread(reference).shape


def test_other_image_null_is_the_same_whatever_the_batch_size(tmp_path: Path, train_synthetic_autoencoder) -> None:
    """The callback hands the whole subset to Decomposition.prepare: partners come from it, not from a batch."""
    autoencoder = train_synthetic_autoencoder()
    samples = []
    for batch_size in (16, 5):
        settings = evaluation(autoencoder, "--evaluation.measure.nulls=[other]", *DECOMPOSITION_SETTINGS,
                              "--evaluation.checks=false", f"--evaluation.batch_size={batch_size}")  # fmt: skip
        root = ["--trainer.default_root_dir", str(tmp_path / str(batch_size))]
        folder = run("validate", *CLASSIFIER, *settings, *NO_LOGGER, *ONE_BATCH, *root)
        (written,) = (folder / "decomposition").glob("val-epoch*-samples.pt")
        samples.append(torch.load(written, weights_only=True))
    assert samples[0]["other_same_class"].all()
    for key in ("other_success", "other_off_success", "other_same_class"):
        assert torch.equal(samples[0][key], samples[1][key]), key
    assert torch.allclose(samples[0]["other_l2"], samples[1]["other_l2"], atol=1e-5)


def test_measure_needing_an_autoencoder_is_off_without_one(tmp_path: Path) -> None:
    root = ["--trainer.default_root_dir", str(tmp_path)]
    fit = run("fit", *CLASSIFIER, *CSV, *ONE_BATCH, "--trainer.max_epochs=1", *root)  # the default Decomposition
    assert not (fit / "decomposition").exists() and not any("decomposition" in key for key in metrics(fit))
    with pytest.warns(UserWarning, match="Detection is off: no autoencoder"):
        validate = run("validate", *DETECTION, *NO_LOGGER, *ONE_BATCH, *root)
    assert not (validate / "detection").exists()


@pytest.mark.parametrize("name", ["num_images", "batch_size", "every_n_epochs"])
def test_bad_arguments_raise(name: str, capsys) -> None:
    with pytest.raises(DmmError, match=f"evaluation.{name} must be >= 1"):
        Evaluation(**{name: 0})
    with pytest.raises(DmmError, match="num_grid"):
        Evaluation(num_grid=-1)
    with pytest.raises(SystemExit) as exit_info:  # on the command line: one line, no traceback
        run("validate", *CLASSIFIER, *NO_LOGGER, f"--evaluation.{name}=0", "--trainer.default_root_dir", "runs")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"evaluation.{name} must be >= 1" in err and "Traceback" not in err


@pytest.mark.parametrize("failure", ["experiment", "media"])
def test_wandb_media_go_through_the_guarded_logger(
    failure: str, tmp_path: Path, train_synthetic_autoencoder, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Histograms, the records table and the grid reach W&B through ``log_to_experiment``; if W&B then fails,
    or building the media does, a warning is all: the run ends normally with its results on disk."""
    import wandb

    autoencoder = train_synthetic_autoencoder()
    sent: list[tuple[ResilientWandbLogger, dict]] = []
    original = ResilientWandbLogger.log_to_experiment

    def broken(*args, **kwargs):
        raise RuntimeError("W&B is down")

    def spy(self: ResilientWandbLogger, payload: dict) -> None:
        sent.append((self, payload))
        monkeypatch.setattr(type(self.experiment), "log", broken)  # W&B fails from here on
        original(self, payload)

    monkeypatch.setattr(ResilientWandbLogger, "log_to_experiment", spy)
    if failure == "media":
        monkeypatch.setattr(wandb, "Table", broken)
    settings = evaluation(autoencoder, *DECOMPOSITION_SETTINGS, "--evaluation.checks=false", "--evaluation.num_grid=2")
    root = ["--trainer.default_root_dir", str(tmp_path)]
    with caplog.at_level(logging.WARNING):  # W&B offline (conftest) and the CSV logger: the CLI's defaults
        folder = run("validate", *CLASSIFIER, *settings, *QUIET, *ONE_BATCH, *root)
    assert {p.name for p in (folder / "decomposition").iterdir()} == {
        "val-epoch0.json", "val-epoch0-samples.pt", "val-epoch0.png"}  # fmt: skip
    assert "val/decomposition/full/success_rate" in metrics(folder)  # the CSV logger beside W&B
    if failure == "media":
        assert sent == [] and "W&B media of decomposition not logged (RuntimeError: W&B is down)" in caplog.text
        return
    ((logger, payload),) = sent
    assert logger.failed and "W&B failed (RuntimeError: W&B is down)" in caplog.text
    assert isinstance(payload["val/decomposition/records"], wandb.Table)
    assert isinstance(payload["val/decomposition/grid"], wandb.Image)
    assert isinstance(payload["val/decomposition/hist/full_l2"], wandb.Histogram)
    table = payload["val/decomposition/records"]
    index = [int(row[table.columns.index("index")]) for row in table.data]
    assert index == seeded_subset("val", NUM_IMAGES)[0].tolist()
