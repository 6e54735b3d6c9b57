"""The report of a real `dmm test` run folder: what the evaluation writes, the report reads.

The only test of :mod:`dmm.report` that runs the `dmm` command. Every setting it needs is in the YAML files
written below (``--config`` files and ``--ckpt_path`` only on the command line), so a renamed key is fixed
in one place: :func:`_configs`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
QUICK = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1}
QUIET = {"logger": False, "enable_progress_bar": False}


def _configs(root: Path, autoencoder: Path | None = None) -> dict[str, Path]:
    """Tiny trainer settings for the two fits, and the decomposition settings for the test run."""
    contents = {
        "ae": {"trainer": {**QUICK, **QUIET, "default_root_dir": str(root / "ae")}},
        "clf": {"trainer": {**QUICK, **QUIET, "default_root_dir": str(root / "clf")}},
        "test": {
            "trainer": {**QUIET, "default_root_dir": str(root / "test")},
            # step_size null is 2.5 eps / steps: the attack can reach its budget.
            "evaluation": {
                "autoencoder": str(autoencoder),
                "num_images": 32,
                "measure": {"init_args": {"attack": {"steps": 10, "eps": 2.0, "step_size": None}}},
            },
        },
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(content))
    return paths


def _new_run(root: Path, *args: str) -> Path:
    """Run the `dmm` command and return the run folder it made under ``root``."""
    from dmm.cli import main as dmm

    before = set(root.glob("*"))
    os.environ.pop("DMM_RUN_DIR", None)
    dmm(list(args))
    os.environ.pop("DMM_RUN_DIR", None)
    (folder,) = set(root.glob("*")) - before
    return folder


def test_report_of_a_real_test_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dmm.report import main

    configs = _configs(tmp_path)
    autoencoder = _new_run(
        tmp_path / "ae", "fit", "--config", str(CONFIGS / "autoencoder.yaml"), "--config", str(configs["ae"])
    )
    classifier = _new_run(
        tmp_path / "clf", "fit", "--config", str(CONFIGS / "classifier.yaml"), "--config", str(configs["clf"])
    )
    configs = _configs(tmp_path, autoencoder / "checkpoints" / "last.ckpt")
    run = _new_run(
        tmp_path / "test",
        "test",
        "--config",
        str(CONFIGS / "classifier.yaml"),
        "--config",
        str(configs["test"]),
        "--ckpt_path",
        str(classifier / "checkpoints" / "last.ckpt"),
    )

    main([str(run), "--out", str(tmp_path / "report"), "--bootstrap", "100"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (entry,) = report["runs"]
    (results,) = run.glob("decomposition/test-epoch*.json")
    payload = json.loads(results.read_text())
    assert entry["arms"] == payload.get("arms", ["full", "on", "off"]) == list(entry["figures"]["attacks"])
    assert entry["figures"]["num_images"] == 32 and entry["autoencoder"]["class"] == "Autoencoder"
    assert entry["autoencoder"]["mse"] > 0  # found from the autoencoder's checkpoint
    checks = {c["name"]: c["status"] for c in entry["checks"]}
    assert checks["figures recomputed from the samples equal the logged summary"] == "PASS"
    assert checks["the attack can reach its budget"] == "PASS"
    assert (entry["model_checks"] is None) == ("model_checks" not in payload)
    assert "| " in capsys.readouterr().out  # the headline table, printed
