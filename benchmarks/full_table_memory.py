"""Peak memory (max RSS) of training a full table, as a multiple of its tables' bytes, beside the interpreter's own.

Run: ``python benchmarks/full_table_memory.py DATA RUN [--optimizer sgd,adagrad,adam]``, DATA from e.g.
``compemb synth --out DATA --train-rows 50000 --eval-rows 5000 --scale 0.47`` (about 1 GB of fp32 tables at
d = 16). For each optimizer it trains one epoch (``compemb train --method full``, into ``RUN-OPTIMIZER``), then
resumes the finished run (a checkpoint read back), each in its own process, and prints a markdown table: the
tables' bytes, the peak RSS of the run and of the resume, their ratio to the tables, and the RSS of importing
compemb and torch alone (what any run pays first). Issue 27's target: peak within 2.5x the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def _peak_rss_bytes(command: list[str]) -> int:
    """Max RSS of one child process (a fresh interpreter for each: RUSAGE_CHILDREN keeps the largest child's)."""
    probe = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
        *command,
    ]
    return int(subprocess.run(probe, check=True, capture_output=True, text=True).stdout.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("run")
    parser.add_argument("--optimizer", default="sgd,adagrad,adam")
    args = parser.parse_args()
    manifest = json.loads((Path(args.data) / "manifest.json").read_text())
    tables = sum(manifest["cardinalities"]) * 16 * 4
    baseline = _peak_rss_bytes([sys.executable, "-c", "import compemb.train, torch"])
    print(
        f"full tables: {sum(manifest['cardinalities']):,} rows x 16 fp32 = {tables / 1e9:.3f} GB; "
        f"importing compemb and torch alone: {baseline / 1e9:.3f} GB\n"
    )
    print("| optimizer | peak RSS training | x tables | peak RSS resuming | x tables |")
    print("|---|---|---|---|---|")
    for optimizer in args.optimizer.split(","):
        out = f"{args.run}-{optimizer}"
        shutil.rmtree(out, ignore_errors=True)
        train = [
            sys.executable,
            "-m",
            "compemb",
            "train",
            "--data",
            args.data,
            "--out",
            out,
            "--method",
            "full",
            "--optimizer",
            optimizer,
            "--lr",
            "0.01" if optimizer == "adam" else "0.1",
            "--quiet",
        ]
        trained = _peak_rss_bytes(train)
        resumed = _peak_rss_bytes([*train, "--resume"])
        print(
            f"| {optimizer} | {trained / 1e9:.2f} GB | {trained / tables:.2f}x | {resumed / 1e9:.2f} GB | "
            f"{resumed / tables:.2f}x |"
        )
    print(f"\n`{' '.join(['python', *sys.argv])}`")


if __name__ == "__main__":
    main()
