"""`python -m kubetune.cli`: the `kubetune` command (the console script points at the same `main`)."""

import sys

from kubetune.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
