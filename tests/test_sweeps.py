"""W&B sweep files: every parameter is a key of the CLI, and the command the agent builds runs.

Commands are built by W&B's own code (``wandb.sdk.launch.sweeps.utils``, which the agent calls), so the
``--key=value`` spelling, the ``${...}`` macros and ``${envvar:NAME}`` are W&B's, not a re-implementation.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from dmm.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
# A sweep's base config is swapped for these: seconds on a CPU, no download, no logger.
CHEAP_BASE = [str(CONFIGS / "synthetic" / "classifier.yaml"), str(CONFIGS / "trainer" / "debug.yaml")]
CHEAP_EVALUATION = ["--evaluation.num_images=8", "--evaluation.measure.attack.steps=5", "--evaluation.num_grid=0"]

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def sample(spec: dict, rng: random.Random):
    """One value of a W&B parameter spec, drawn as the sweep controller would."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    low, high = spec["min"], spec["max"]
    default = "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
    distribution = spec.get("distribution", default)
    if distribution == "uniform":
        return rng.uniform(low, high)
    if distribution == "int_uniform":
        return rng.randint(low, high)
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    raise NotImplementedError(f"teach sample() the distribution {distribution!r}")


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command the W&B agent runs for these parameter values (as in ``wandb_agent.Agent._command_run``)."""
    command = create_sweep_command(list(sweep["command"]))  # fills in ${envvar:NAME}
    macros = create_sweep_command_args({"args": {key: {"value": value} for key, value in values.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [sweep["program"]]}
    line = []
    for part in command:
        line += macros[part[2:-1]] if part.startswith("${") and part.endswith("}") else [part]
    return line


def dmm_arguments(sweep: dict, values: dict) -> list[str]:
    """The arguments after ``dmm`` in the agent's command."""
    line = agent_command(sweep, values)
    assert line[:2] == ["/usr/bin/env", "dmm"], line
    return line[2:]


def _lookup(config: dict, dotted: str):
    """The value at a dotted CLI key in a printed config, whose class-typed values nest under ``init_args``."""
    for part in dotted.split("."):
        config = config[part] if part in config else config["init_args"][part]
    return config


@pytest.fixture
def checkpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment the ε sweeps expect; the files need not exist to parse."""
    monkeypatch.setenv("DMM_CLASSIFIER", "classifier.ckpt")
    monkeypatch.setenv("DMM_AUTOENCODER", "autoencoder.ckpt")


def test_there_are_sweeps() -> None:
    names = {path.stem for path in SWEEPS}
    assert {"mnist_eps", "mnist_classifier"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_parameter_is_a_cli_key(path: Path, checkpoint_env, capsys) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"]["name"].startswith(("val/", "test/")) and "${args}" in sweep["command"]
    values = {name: sample(spec, random.Random(0)) for name, spec in sweep["parameters"].items()}
    args = dmm_arguments(sweep, values)
    assert not any("${" in arg or "=DMM_" in arg for arg in args), args  # every macro filled in
    base = args.index("--config") + 1
    args[base] = str(ROOT / args[base])  # relative to the repository root, where agents are started
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for name, value in values.items():
        assert _lookup(printed, name) == value, name


def _fit(root: Path, config: str) -> Path:
    """Two training steps of a synthetic config; the last checkpoint of its run folder."""
    os.environ.pop("DMM_RUN_DIR", None)
    limits = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    main(["fit", f"--config={CONFIGS / 'synthetic' / config}", f"--trainer.default_root_dir={root}", *limits, *quiet])
    (checkpoint,) = root.glob("*/checkpoints/last.ckpt")
    return checkpoint


@pytest.mark.parametrize("name", ["mnist_classifier", "mnist_eps_linf"])
def test_a_sampled_sweep_run_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
    if "DMM_CLASSIFIER" in str(sweep["command"]):  # ε sweeps evaluate trained checkpoints
        monkeypatch.setenv("DMM_AUTOENCODER", str(_fit(tmp_path / "ae", "autoencoder.yaml")))
        monkeypatch.setenv("DMM_CLASSIFIER", str(_fit(tmp_path / "clf", "classifier.yaml")))
    values = {key: sample(spec, random.Random(1)) for key, spec in sweep["parameters"].items()}
    args = dmm_arguments(sweep, values)
    base = args.index("--config") + 1
    assert args[base].startswith("configs/")
    args[base : base + 1] = [CHEAP_BASE[0], "--config", CHEAP_BASE[1]]
    os.environ.pop("DMM_RUN_DIR", None)
    main([*args, *CHEAP_EVALUATION, f"--trainer.default_root_dir={tmp_path / 'sweep'}"])
    (folder,) = (tmp_path / "sweep").iterdir()
    if sweep["metric"]["name"].startswith("test/decomposition/"):  # the metric the sweep optimises is logged
        settings, summary = (json.loads((folder / "decomposition" / "test-epoch0.json").read_text())[key]
                             for key in ("settings", "summary"))  # fmt: skip
        assert sweep["metric"]["name"].removeprefix("test/decomposition/") in summary
        for name, value in values.items():  # every swept attack setting and eps_curve reached the measure
            key = name.rpartition(".")[2]
            if key in settings:
                assert settings[key] == value, name
        if settings["norm"] == "linf":
            assert settings["arms"] == ["full"]
