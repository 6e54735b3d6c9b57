"""The `dmm` command: every config runs, runs get their own folders, bad input fails clearly."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

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
        if p.parent.name not in {"trainer", "cifar10", "imagenet"} and not p.name.startswith("relabel")
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
        "--evaluation.autoencoder",
        str(autoencoder),
        "--evaluation.num_images",
        "24",
        "--evaluation.measure.attack.steps",
        "5",
        "--evaluation.batch_size",
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
        (
            ["--evaluation.measure.attack.eps", "-1", "--evaluation.autoencoder", "x.ckpt"],
            "--evaluation.measure.init_args.attack (PGD): attack eps",
        ),
        (
            ["--evaluation.autoencoder", "missing.ckpt"],
            "dmm fit --config configs/<dataset>/autoencoder.yaml",
        ),
    ],
)
def test_bad_input_is_one_clear_error(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("dmm: error: ")  # the message first: no usage dump of every option before it
    assert "usage:" not in err and len(err.splitlines()) < 15


def test_parse_error_points_to_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--trainer.max_epochs", "abc")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('dmm: error: Parser key "trainer.max_epochs"') and "Given value: abc" in err
    assert err.rstrip().endswith("See `dmm fit --help` for the options.")
    assert not Path("runs").exists()  # refused before any run folder


def _one_line_error(capsys, *args: str) -> str:
    """stderr's `dmm: error:` line of a command that must fail with exit status 2, checked to be alone."""
    with pytest.raises(SystemExit) as exit_info:
        run(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dmm: error:")]
    return line


def test_invalid_learning_rate_is_one_line_naming_the_option(capsys) -> None:
    line = _one_line_error(
        capsys, "fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP,
        "--model.init_args.optimizer.init_args.lr", "-1",
    )  # fmt: skip
    assert "--model.init_args.optimizer (torch.optim.Adam)" in line and "Invalid learning rate: -1.0" in line
    assert not list(Path("runs").glob("*"))  # the run never started: nothing left behind


def test_mean_std_length_is_checked_before_training(capsys) -> None:
    line = _one_line_error(
        capsys, "fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP,
        "--model.init_args.mean", "[0.1,0.2]",
    )  # fmt: skip
    assert "mean" in line and "1" in line  # two values for 1-channel images
    assert not list(Path("runs").glob("*"))


class WrongSizes(nn.Module):
    """A network whose first batch fails inside torch (a user's mistake in a network they configured)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_first_batch_failure_of_a_configured_class_names_its_key(capsys) -> None:
    line = _one_line_error(
        capsys, "fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP,
        "--model.init_args.network", f"{__name__}.WrongSizes",
    )  # fmt: skip
    assert line.startswith(f"dmm: error: --model.init_args.network ({__name__}.WrongSizes): RuntimeError: mat1")
    assert "DMM_TRACEBACK=1" in line
    assert not list(Path("runs").glob("*"))


def test_internal_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy_forward(self, x):
        return self.no_such_attribute  # a bug in code, not a setting: AttributeError with its traceback

    monkeypatch.setattr(Classifier, "forward", buggy_forward)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP)
    monkeypatch.undo()
    monkeypatch.setenv("DMM_TRACEBACK", "1")  # and every error keeps it on request
    with pytest.raises(ValueError, match="Invalid learning rate"):
        run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP,
            "--model.init_args.optimizer.init_args.lr", "-1")  # fmt: skip


@pytest.mark.parametrize("ckpt_path", ["best", "last", "runs/typo.ckpt"])
@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_checkpoint_path_that_is_not_a_file_is_one_line(subcommand: str, ckpt_path: str, capsys) -> None:
    line = _one_line_error(
        capsys, subcommand, "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *CHEAP, "--ckpt_path", ckpt_path
    )
    assert f"--ckpt_path {ckpt_path}" in line and "runs/<run>/checkpoints/best-*.ckpt" in line
    assert ("no such file" in line) == ckpt_path.endswith(".ckpt")
    assert not Path("runs").exists()


def test_run_folder_as_checkpoint_path_means_its_best_checkpoint(tmp_path: Path) -> None:
    config = ["--config", str(CONFIGS / "synthetic" / "classifier.yaml")]
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    run("fit", *config, *quiet, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "fit"))  # fmt: skip
    (fit_run,) = (tmp_path / "fit").iterdir()
    (best,) = fit_run.glob("checkpoints/best-*.ckpt")
    run("test", *config, *quiet, "--trainer.limit_test_batches", "1", "--ckpt_path", str(fit_run),
        "--trainer.default_root_dir", str(tmp_path / "test"))  # fmt: skip
    (test_run,) = (tmp_path / "test").iterdir()
    assert yaml.safe_load((test_run / "config.yaml").read_text())["ckpt_path"] == str(best)


def test_full_config_is_on_the_offline_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    import dmm.cli

    wandb.finish()  # no run left over from another test in this process
    monkeypatch.setattr(dmm.cli, "finish_wandb", lambda exit_code: None)  # keep the run open to read it back
    run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    try:
        config = wandb.run.config.as_dict()
        assert wandb.run.settings.mode in ("offline", "dryrun")
    finally:
        wandb.finish()
    (folder,) = tmp_path.iterdir()
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    for section in ("trainer", "model", "data", "checkpoint", "evaluation", "seed_everything"):
        assert config[section] == saved[section], section  # every setting, as config.yaml has it
    assert config["trainer"]["max_epochs"] == 1 and config["trainer"]["limit_train_batches"] == 2
    assert config["model"]["class_path"].endswith("Classifier")
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(1e-3)
    assert config["data"]["class_path"].endswith("SyntheticManifoldDataModule")
    (offline,) = folder.glob("wandb/offline-run-*/run-*.wandb")  # and it reached the run's offline file
    saved_bytes = offline.read_bytes()  # W&B stores each config section as JSON, spacing by version
    assert re.search(rb'"max_epochs": ?1,', saved_bytes) and re.search(rb'"limit_train_batches": ?2', saved_bytes)


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
    assert not list(Path("runs").glob("*"))  # the run never started: no empty run folder left behind


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
            "--evaluation.autoencoder",
            str(autoencoder),
        )
    assert exit_info.value.code == 2
    assert "(1, 16, 16)" in capsys.readouterr().err
