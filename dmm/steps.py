"""Resumable steps of a study (`python -m dmm.seeds`, `python -m dmm.regimes`): one `dmm` command per folder,
marked ``done`` when it finished, so a rerun of a killed study redoes only what did not finish."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from dmm.cli import RUN_DIR_ENV
from dmm.errors import DmmError

log = logging.getLogger("dmm.steps")


def in_subprocess(args: list[str]) -> int:
    """``python -m dmm <args>`` in a fresh process (its run folder from the environment); its exit status."""
    return subprocess.run([sys.executable, "-m", "dmm", *args], env=dict(os.environ)).returncode


def resumable_step(folder: Path, args: list[str], run: Callable[[list[str]], int] = in_subprocess) -> None:
    """Run ``dmm <args>`` into ``folder`` (``DMM_RUN_DIR``) unless it finished before; a folder without ``done``
    is removed and redone. ``run`` executes the command and returns its exit status."""
    if (folder / "done").is_file():
        log.info("%s: done before, kept", folder)
        return
    if folder.exists():
        log.info("%s: unfinished, removed and run again", folder)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(folder)
    log.info("dmm %s", shlex.join(args))
    try:
        status = run(args)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        if previous is not None:
            os.environ[RUN_DIR_ENV] = previous
    if status:
        raise DmmError(f"`dmm {shlex.join(args)}` failed (exit {status}); its output is above, its folder {folder}")
    (folder / "done").write_text("")
