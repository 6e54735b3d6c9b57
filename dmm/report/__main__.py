"""``python -m dmm.report``: see :mod:`dmm.report.cli`."""

from dmm.report.cli import main

main()
