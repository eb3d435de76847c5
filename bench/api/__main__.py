"""``python -m bench.api``: the same as ``python -m bench api``."""
from __future__ import annotations

import sys

from bench.api.cli import main

if __name__ == "__main__":
    sys.exit(main())
