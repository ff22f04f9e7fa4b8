"""``python -m compemb.cli ...``: the same command line as ``compemb ...``."""

import sys

from compemb.cli import main

if __name__ == "__main__":
    sys.exit(main())
