"""``python -m bench.analysis``: the same as ``python -m bench analysis``."""
from __future__ import annotations

import sys

from bench.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
