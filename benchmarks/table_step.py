"""One Adam step of a full table: 33.8M x 16 against 340k x 16; writes results/table_step.{md,json}.

Issue 13, item 2: with torch's Adam (dense gradients) a step touches every row, so it costs O(rows); with
compemb's RowAdam (sparse gradients, the Trainer's ``adam``) only the rows a batch touched. Each configuration
builds one ``FullEmbedding`` (sparse gradients for RowAdam), then times forward + backward + step of a Criteo-sized
batch (2,048 samples x 26 ids, uniform) for ``--steps`` steps after two warm-up steps, and reports the median. The
target: the large table's step within 1.5x of the small one's, for RowAdam.

    python benchmarks/table_step.py [--large 33800000] [--small 340000] [--steps 5]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from compemb import FullEmbedding
from compemb.io import atomic_write_text
from compemb.optim import RowAdam

RESULTS = Path(__file__).parent / "results"
TARGET = 1.5


def step_seconds(rows: int, dim: int, row_wise: bool, steps: int, batch: int = 2048 * 26) -> float:
    """Median seconds of forward + backward + step of one full table of ``rows`` ids."""
    table = FullEmbedding(rows, dim, sparse=row_wise, seed=0)
    optimizer = RowAdam(table.parameters(), lr=1e-3) if row_wise else torch.optim.Adam(table.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    times = []
    for index in range(steps + 2):
        ids = torch.randint(0, rows, (batch,), generator=generator)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        table(ids).square().sum().backward()
        optimizer.step()
        if index >= 2:  # the first steps allocate the moments
            times.append(time.perf_counter() - started)
    del table, optimizer
    gc.collect()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=33_800_000)
    parser.add_argument("--small", type=int, default=340_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS / "table_step"))
    args = parser.parse_args()
    rows = []
    for row_wise, name in ((True, "RowAdam (adam)"), (False, "torch Adam (adam_dense)")):
        small = step_seconds(args.small, args.dim, row_wise, args.steps)
        large = step_seconds(args.large, args.dim, row_wise, args.steps)
        rows.append({"optimizer": name, "small_ms": 1e3 * small, "large_ms": 1e3 * large, "ratio": large / small})
    lines = [
        f"One step (forward, backward, Adam) of a full table, 2,048 x 26 uniform ids, dim {args.dim}: "
        f"{args.large:,} rows against {args.small:,}; median of {args.steps} steps; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {datetime.date.today()}.",
        "",
        f"| optimizer | {args.small:,} rows (ms) | {args.large:,} rows (ms) | large / small | target |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        target = (
            f"<= {TARGET}x: {'met' if r['ratio'] <= TARGET else 'MISSED'}" if r["optimizer"].startswith("Row") else "-"
        )
        lines.append(f"| {r['optimizer']} | {r['small_ms']:.1f} | {r['large_ms']:.1f} | {r['ratio']:.2f}x | {target} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(f"{args.output}.md", text)
    atomic_write_text(f"{args.output}.json", json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
