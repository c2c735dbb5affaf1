"""`python -m minaf3 ...`: the same command line as the `minaf3` script (see cli.py)."""

import sys

from minaf3.cli import main

if __name__ == "__main__":
    sys.exit(main())
