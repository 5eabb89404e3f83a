"""``python -m microcircuits ...``: the ``microcircuits`` command (also under torchrun)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
