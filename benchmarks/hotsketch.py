"""HotSketch speed through the Python API; writes benchmarks/results/hotsketch.{md,json}.

Batches of 4,096 IDs drawn from Zipf(1.1) over 1M IDs (relabelled at random, so frequent IDs are not consecutive
integers) go into a sketch of 100k buckets x 4 slots: ``insert`` with float scores (CAFE's gradient norms),
``insert`` in frequency mode (no scores), and ``query``. Each round times one pass over all batches; the rate is
the median over rounds, after a warm-up pass (numba compilation and first-touch page faults stay out of it).
``--backend merge`` times the vectorised merge (the device path's insert), ``--backend torch`` the sequential torch
ops (its reference) instead of the compiled kernels, and ``--device cuda``
runs them on a GPU (the output then gains the backend and device in its name).

    python benchmarks/hotsketch.py [--rounds 7] [--batches 128] [--backend auto|torch|merge] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch

from compemb.io import atomic_write_text
from compemb.sketch import HotSketch

TARGETS = {"insert": 25.0, "insert (frequency)": 25.0, "query": 50.0}  # M IDs/s, from the issue


def run(
    rounds: int,
    num_batches: int,
    batch_size: int,
    num_ids: int,
    num_buckets: int,
    seed: int,
    backend: str = "auto",
    device: str = "cpu",
) -> dict:
    """Median M IDs/s of each operation, with the settings and machine."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_ids + 1, dtype=np.float64) ** -1.1
    ranks = rng.choice(num_ids, size=num_batches * batch_size, p=weights / weights.sum())
    ids = torch.from_numpy(rng.permutation(num_ids)[ranks]).view(num_batches, batch_size).to(device).unbind(0)
    # gradient-norm-like scores, normalised to mean 1 per batch as CAFE does
    scores = torch.from_numpy(rng.exponential(1.0, (num_batches, batch_size)).astype(np.float32))
    scores = scores.to(device).unbind(0)
    sketch = HotSketch(num_buckets, 4, backend=backend, device=device)
    synchronize = torch.cuda.synchronize if sketch.keys.is_cuda else (lambda: None)

    operations: dict[str, Callable[[int], object]] = {
        "insert": lambda i: sketch.insert(ids[i], scores[i]),
        "insert (frequency)": lambda i: sketch.insert(ids[i]),
        "query": lambda i: sketch.query(ids[i]),
    }
    rates = {}
    for name, operation in operations.items():
        for i in range(num_batches):  # warm-up
            operation(i)
        per_round = []
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(num_batches):
                operation(i)
            synchronize()  # a query's results may still be in flight on a GPU
            per_round.append(num_batches * batch_size / (time.perf_counter() - start) / 1e6)
        rates[name] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
    return {
        "rates_m_ids_per_s": rates,
        "targets_m_ids_per_s": TARGETS,
        "settings": {
            "rounds": rounds,
            "batches": num_batches,
            "batch_size": batch_size,
            "num_ids": num_ids,
            "num_buckets": num_buckets,
            "slots": 4,
            "zipf": 1.1,
            "seed": seed,
            "sketch_bytes": sketch.memory().total,
            "backend": "compiled"
            if sketch._compiled
            else ("vectorised merge" if sketch._merges else "torch ops, sequential rounds"),
            "device": str(sketch.keys.device),
            "torch": torch.__version__,
            "numba": numba.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "date": datetime.date.today().isoformat(),
        },
    }


def table(result: dict) -> str:
    """The result as markdown."""
    s = result["settings"]
    lines = [
        f"HotSketch through the Python API: batches of {s['batch_size']:,} IDs from Zipf({s['zipf']}) over "
        f"{s['num_ids']:,} IDs, sketch of {s['num_buckets']:,} buckets x {s['slots']} slots "
        f"({s['sketch_bytes']:,} bytes); median over {s['rounds']} rounds of {s['batches']} batches after a "
        f"warm-up pass; {s.get('backend', 'compiled')} on {s.get('device', 'cpu')}; torch {s['torch']}, numba {s['numba']}, {s['threads']} threads, {s['date']}.",
        "",
        "| operation | M IDs/s (median) | min | max | target | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, rate in result["rates_m_ids_per_s"].items():
        target = result["targets_m_ids_per_s"][name]
        met = "yes" if rate["median"] >= target else "NO"
        median, low, high = rate["median"], rate["min"], rate["max"]
        lines.append(f"| {name} | {median:.1f} | {low:.1f} | {high:.1f} | >= {target:g} | {met} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run, print the table and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--num-ids", type=int, default=1_000_000)
    parser.add_argument("--buckets", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["auto", "torch", "merge"], default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    default_name = (
        "hotsketch"
        if (args.backend, args.device) == ("auto", "cpu")
        else f"hotsketch_{args.backend}_{args.device.replace(':', '')}"
    )
    args.output = args.output or Path(__file__).parent / "results" / default_name
    result = run(
        args.rounds, args.batches, args.batch_size, args.num_ids, args.buckets, args.seed, args.backend, args.device
    )
    text = table(result)
    print(text)
    atomic_write_text(args.output.with_suffix(".md"), text + "\n")
    atomic_write_text(args.output.with_suffix(".json"), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
