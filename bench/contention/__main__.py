"""``python -m bench.contention``: the same as ``python -m bench contention``."""
from __future__ import annotations

import sys

from bench.contention.cli import main

if __name__ == "__main__":
    sys.exit(main())
