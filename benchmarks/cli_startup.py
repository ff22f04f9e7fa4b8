"""`compemb --help` start-up against `python -c "import torch"`, alternating, median of N runs each (one run).

Run: ``python benchmarks/cli_startup.py [N]``; prints both medians and their ratio (issue 26's target: <= 1.5x).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(runs: int = 7) -> None:
    help_times, torch_times = [], []
    for _ in range(runs):  # alternating: both see the same machine load
        help_times.append(_seconds([sys.executable, "-m", "compemb", "--help"]))
        torch_times.append(_seconds([sys.executable, "-c", "import torch"]))
    help_s, torch_s = statistics.median(help_times), statistics.median(torch_times)
    print(f"compemb --help {help_s:.2f} s, import torch {torch_s:.2f} s: {help_s / torch_s:.2f}x (median of {runs})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
