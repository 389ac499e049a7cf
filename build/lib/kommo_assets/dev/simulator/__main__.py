"""``python -m kommo_assets.dev.simulator``: see cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
