from __future__ import annotations

import sys

from xrwatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
