"""Criteo preprocessing throughput; writes benchmarks/results/preprocess.{md,json}.

Input: the shared Kaggle sample repeated to ``--rows`` rows (a synthetic TSV when the sample is absent), plain
and gzip. Figures, all measured in this run: the full ``preprocess_criteo`` (count pass, categorify, write),
in one process and in ``--processes`` (byte ranges of the plain file), the readable pure-Python ``parse_row`` over
the same lines (the baseline), and reading the bytes alone (the I/O ceiling). Target: >= 400k rows/s for the full
preprocessing of plain input on every core.

    python benchmarks/preprocess.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from compemb.data.criteo import parse_row, preprocess_criteo
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.io import atomic_write_text

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-kaggle-sample" / "train.txt"
TARGET = 400_000  # issue 13: plain input, every core of this 2-core machine


def _input(directory: Path, rows: int) -> tuple[Path, str]:
    if SAMPLE.exists():
        lines, what = SAMPLE.read_bytes().splitlines(keepends=True), "shared Kaggle sample, repeated"
    else:
        config = SyntheticConfig(rows={"train": 10_000}, seed=0)
        generate_synthetic(directory / "synth", config, progress=False, tsv=directory / "synth.tsv")
        lines, what = (directory / "synth.tsv").read_bytes().splitlines(keepends=True), "synthetic TSV, repeated"
    path = directory / "train.txt"
    with open(path, "wb") as file:
        for start in range(0, rows, len(lines)):
            file.write(b"".join(lines[: min(len(lines), rows - start)]))
    return path, what


def _rate(rows: int, work) -> float:
    started = time.perf_counter()
    work()
    return rows / (time.perf_counter() - started)


def main() -> None:
    """Measure and record the rates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline-rows", type=int, default=100_000, help="lines the pure-Python parser reads")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "preprocess"))
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="for the parallel row")
    parser.add_argument("--piece-bytes", type=int, default=16 << 20, help="the parallel row's byte ranges")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="compemb-preprocess-"))
    try:
        path, what = _input(directory, args.rows)
        with open(path, "rb") as source, gzip.open(directory / "train.txt.gz", "wb", compresslevel=6) as target:
            shutil.copyfileobj(source, target)
        preprocess_criteo(path, directory / "warm", progress=False)  # compiles the parser once (cached after)

        def read_bytes() -> None:
            with open(path, "rb") as file:
                while file.read(1 << 25):
                    pass

        def python_parse() -> None:
            with open(path, encoding="utf-8") as file:
                for _, line in zip(range(args.baseline_rows), file):
                    parse_row(line)

        rates = {
            "read bytes only": _rate(args.rows, read_bytes),
            "pure-Python parse_row (baseline)": _rate(args.baseline_rows, python_parse),
            "preprocess_criteo, plain, 1 process": _rate(
                args.rows, lambda: preprocess_criteo(path, directory / "a1", progress=False, processes=1)
            ),
            f"preprocess_criteo, plain, {args.processes} processes": _rate(
                args.rows,
                lambda: preprocess_criteo(
                    path, directory / "a", progress=False, processes=args.processes, piece_bytes=args.piece_bytes
                ),
            ),
            "preprocess_criteo, gzip (one file: one process)": _rate(
                args.rows, lambda: preprocess_criteo(directory / "train.txt.gz", directory / "b", progress=False)
            ),
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    baseline = rates["pure-Python parse_row (baseline)"]
    lines = [
        f"# Criteo preprocessing throughput\n\nInput: {args.rows:,} rows ({what}). "
        f"Target: >= {TARGET:,} rows/s for the full preprocessing (two passes, categorify, write).\n",
        "| what | rows/s | x pure-Python parse | x target |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:,.0f} | {rate / baseline:.1f} | {rate / TARGET:.2f} |")
    lines.append(
        f"\n`python benchmarks/preprocess.py --rows {args.rows} --processes {args.processes} "
        f"--piece-bytes {args.piece_bytes}`"
    )
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(f"{args.output}.md", text)
    atomic_write_text(
        f"{args.output}.json",
        json.dumps({"rows": args.rows, "input": what, "rows_per_second": rates, "target": TARGET}, indent=2) + "\n",
    )


if __name__ == "__main__":
    main()
