"""``python -m dmm`` is the ``dmm`` command."""

from dmm.cli import main

main()
