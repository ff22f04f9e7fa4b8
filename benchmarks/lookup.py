"""Lookup speed benchmark; writes benchmarks/results/lookup.{md,json}. Same as `compemb bench lookup`."""

import sys
from pathlib import Path

from compemb.cli import main

if __name__ == "__main__":
    output = Path(__file__).parent / "results" / "lookup"
    sys.exit(main(["bench", "lookup", "--output", str(output), *sys.argv[1:]]))
