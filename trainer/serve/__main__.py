"""`python -m kubetune.trainer.serve`: the server's entry point (`server.main`)."""

import sys

from kubetune.trainer.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
