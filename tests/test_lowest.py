"""The lowest-versions CI job (.ci/lowest) pins every dependency pyproject.toml declares to its floor."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself needs there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_declared_dependency_has_a_floor_that_the_job_pins() -> None:
    script = (ROOT / ".ci" / "lowest").read_text()
    (floors_program,) = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", script, re.S)
    pins = subprocess.run(
        [sys.executable, "-c", floors_program], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = [re.match(r"[A-Za-z0-9_.-]+", spec).group(0) for spec in declared]
    assert [pin.split("==")[0] for pin in pins] == names  # one exact pin per dependency, none missed
    for spec, pin in zip(declared, pins, strict=True):
        assert f">={pin.split('==')[1]}" in spec, (spec, pin)
