"""``python -m dmm.bench``: see :mod:`dmm.bench.cli`."""

import sys

from dmm.bench.cli import main
from dmm.errors import DmmError

try:
    sys.exit(main())
except DmmError as error:
    sys.stderr.write(f"dmm.bench: error: {error}\n")
    sys.exit(2)
