"""Resumable steps of a study (`python -m dmm.seeds`, `python -m dmm.regimes`, `python -m dmm.known`): one `dmm`
command per folder, marked ``done`` when it finished, so a rerun of a killed study redoes only what did not finish.
The ``done`` file records the command and its wall time (JSON), so a study can say how long it took."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dmm.cli import RUN_DIR_ENV
from dmm.errors import DmmError

log = logging.getLogger("dmm.steps")


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """A study's own arguments and, after ``--``, those it passes on to every ``dmm test``."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def in_subprocess(args: list[str]) -> int:
    """``python -m dmm <args>`` in a fresh process (its run folder from the environment); its exit status."""
    return subprocess.run([sys.executable, "-m", "dmm", *args], env=dict(os.environ)).returncode


def in_process(args: list[str]) -> int:
    """``dmm <args>`` in this process (the exit status of a one-line ``dmm: error:``, 0 when it finished)."""
    from dmm.cli import main as dmm_main

    try:
        dmm_main(args)
    except SystemExit as exit_info:  # a one-line `dmm: error:` (status 2), already on stderr
        return int(exit_info.code or 0)
    return 0


def resumable_step(folder: Path, args: list[str], run: Callable[[list[str]], int] = in_subprocess) -> None:
    """Run ``dmm <args>`` into ``folder`` (``DMM_RUN_DIR``) unless it finished before; a folder without ``done``
    is removed and redone. ``run`` executes the command and returns its exit status. ``done`` holds
    ``{"command", "seconds"}``: the command and its wall time."""
    if (folder / "done").is_file():
        log.info("%s: done before, kept", folder)
        return
    if folder.exists():
        log.info("%s: unfinished, removed and run again", folder)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(folder)
    command = f"dmm {shlex.join(args)}"
    log.info("%s", command)
    start = time.perf_counter()
    try:
        status = run(args)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        if previous is not None:
            os.environ[RUN_DIR_ENV] = previous
    if status:
        raise DmmError(f"`{command}` failed (exit {status}); its output is above, its folder {folder}")
    seconds = round(time.perf_counter() - start, 1)
    (folder / "done").write_text(json.dumps({"command": command, "seconds": seconds}))


def step_seconds(folder: Path) -> float:
    """The wall time a finished step recorded in its ``done`` file; NaN when it recorded none (an older study)."""
    try:
        return float(json.loads((folder / "done").read_text())["seconds"])
    except (ValueError, KeyError, TypeError):
        return math.nan
