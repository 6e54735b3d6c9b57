"""The `dmm` command: every config runs, runs get their own folders, bad input fails clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from dmm.cli import main
from dmm.models import Autoencoder, Classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINER_PRESETS = {"debug.yaml", "gpu.yaml"}
CHEAP = [
    "--trainer.fast_dev_run",
    "true",
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
]


def run(*args: str) -> None:
    os.environ.pop("DMM_RUN_DIR", None)
    main(list(args))


pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def experiment_configs() -> list[Path]:
    # CIFAR-10 / ImageNet configs run on fake files in tests/test_data_large.py; relabelled ones need a real
    # N1 checkpoint and run in tests/test_adversarial.py.
    return sorted(
        p
        for p in CONFIGS.rglob("*.yaml")
        if p.parent.name not in {"trainer", "cifar10", "imagenet"} and "relabelled" not in p.name
    )


@pytest.mark.parametrize("config", experiment_configs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_config_runs(config: Path, request: pytest.FixtureRequest) -> None:
    text = config.read_text()
    data_args = []
    if "MNISTDataModule" in text and "FashionMNIST" not in text:
        data_args = ["--data.data_dir", str(request.getfixturevalue("mnist_dir"))]
    elif "FashionMNIST" in text:
        pytest.skip("Fashion-MNIST files are not on this machine; its missing-data error is tested below")
    run("fit", "--config", str(config), "--config", str(CONFIGS / "trainer" / "debug.yaml"), *data_args)


def test_gpu_preset_parses() -> None:
    config = yaml.safe_load((CONFIGS / "trainer" / "gpu.yaml").read_text())
    assert config["trainer"]["accelerator"] == "gpu"
    with pytest.raises(SystemExit) as exit_info:
        run(
            "fit",
            "--config",
            str(CONFIGS / "synthetic" / "classifier.yaml"),
            "--config",
            str(CONFIGS / "trainer" / "gpu.yaml"),
            "--print_config",
        )
    assert exit_info.value.code == 0


def test_runs_get_their_own_folders_and_reload_without_arguments(tmp_path: Path, train_synthetic_autoencoder) -> None:
    checkpoint = train_synthetic_autoencoder()
    train_synthetic_autoencoder()
    folders = sorted((tmp_path / "ae").iterdir())
    assert len(folders) == 2 and all((f / "config.yaml").is_file() for f in folders)
    model = Autoencoder.load_from_checkpoint(checkpoint, weights_only=True)
    assert model.input_shape == (1, 16, 16) and model.latent_dim == 4
    assert model(torch.rand(3, 1, 16, 16)).shape == (3, 1, 16, 16)


def test_decomposition_through_fit_validate_and_test(tmp_path: Path, train_synthetic_autoencoder) -> None:
    autoencoder = train_synthetic_autoencoder()
    callback = [
        "--decomposition.autoencoder",
        str(autoencoder),
        "--decomposition.num_images",
        "24",
        "--decomposition.steps",
        "5",
        "--decomposition.batch_size",
        "16",
    ]
    config = ["--config", str(CONFIGS / "synthetic" / "classifier.yaml")]
    root = ["--trainer.default_root_dir", str(tmp_path / "clf")]
    run(
        "fit",
        *config,
        *callback,
        *root,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    )
    (checkpoint,) = (tmp_path / "clf").glob("*/checkpoints/last.ckpt")
    for subcommand in ("validate", "test"):
        run(subcommand, *config, *callback, *root, "--ckpt_path", str(checkpoint), *CHEAP[2:])
    summaries = sorted(p.name for p in (tmp_path / "clf").glob("*/decomposition/*.json"))
    assert summaries == ["test-epoch0.json", "val-epoch0.json", "val-epoch0.json"]
    classifier = Classifier.load_from_checkpoint(checkpoint, weights_only=True)
    assert classifier(torch.rand(2, 1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.no_such_key", "1"], "no_such_key"),
        (["--trainer.max_epochs", "many"], "max_epochs"),
        (["--decomposition.eps", "-1", "--decomposition.autoencoder", "x.ckpt"], "eps"),
        (
            ["--decomposition.autoencoder", "missing.ckpt"],
            "dmm fit --config configs/<dataset>/autoencoder.yaml",
        ),
    ],
)
def test_bad_input_is_one_clear_error(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP, *args)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_mnist_offline_is_one_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(
            "fit",
            "--config",
            str(CONFIGS / "mnist" / "classifier.yaml"),
            *CHEAP,
            "--data.data_dir",
            str(tmp_path / "nowhere"),
            "--data.download",
            "false",
        )
    assert exit_info.value.code == 2
    assert "--data.data_dir" in capsys.readouterr().err


def test_autoencoder_of_another_shape_is_refused(tmp_path: Path, capsys, train_synthetic_autoencoder) -> None:
    autoencoder = train_synthetic_autoencoder()  # trained on 16x16 images
    with pytest.raises(SystemExit) as exit_info:
        run(
            "fit",
            "--config",
            str(CONFIGS / "synthetic" / "classifier.yaml"),
            *CHEAP,
            "--data.image_size",
            "12",
            "--decomposition.autoencoder",
            str(autoencoder),
        )
    assert exit_info.value.code == 2
    assert "(1, 16, 16)" in capsys.readouterr().err
