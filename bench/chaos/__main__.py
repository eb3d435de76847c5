"""``python -m bench.chaos``: the same as ``python -m bench chaos``."""
from __future__ import annotations

import sys

from bench.chaos.cli import main

if __name__ == "__main__":
    sys.exit(main())
