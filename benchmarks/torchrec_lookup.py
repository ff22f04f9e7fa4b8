"""The TorchRec adapter's lookup against compemb's own collection; writes benchmarks/results/torchrec_lookup.{md,json}.

For each method, one ``CompressedEmbeddingBagCollection`` and one ``EmbeddingCollection`` with the same tables
(26 features of ``--ids`` ids, 16 dims, 100x per feature, same seed) look up the same batch of 2,048 rows, one id
per feature: the adapter from a ``KeyedJaggedTensor``, the collection from the ``(batch, 26)`` id matrix; forward
and backward of the pooled vectors' sum, sparse gradients. Each round times ``--steps`` steps of each, alternating;
the ratio is the median over rounds of adapter / collection. Target (issue 14): within 1.1x.

    python benchmarks/torchrec_lookup.py [--methods hash,qr,ce,cce,cafe] [--rounds 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compemb.collection import EmbeddingCollection, Feature
from compemb.integrations.torchrec import CompressedEmbeddingBagCollection
from compemb.io import atomic_write_text

TARGET = 1.1
FEATURES, BATCH, DIM = 26, 2048, 16


def time_steps(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(method: str, num_ids: int, rounds: int, steps: int) -> dict:
    """Seconds per forward+backward of each, and the median ratio."""
    configs = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=num_ids, feature_names=[f"f{i}"])
        for i in range(FEATURES)
    ]
    adapter = CompressedEmbeddingBagCollection(configs, method=method, compression=100, seed=0, sparse=True)
    own = EmbeddingCollection(
        [Feature(f"t{i}", num_ids) for i in range(FEATURES)], DIM, method, compression=100, seed=0, sparse=True
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, num_ids, (BATCH, FEATURES), generator=generator)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        [f"f{i}" for i in range(FEATURES)], ids.t().reshape(-1), torch.ones(ids.numel(), dtype=torch.int64)
    )

    def adapter_step() -> None:
        adapter.zero_grad(set_to_none=True)
        adapter(kjt).values().sum().backward()

    def own_step() -> None:
        own.zero_grad(set_to_none=True)
        own(ids).sum().backward()

    for step in (adapter_step, own_step):  # warm-up: compiled kernels, first-touch pages
        time_steps(step, 3)
    seconds: dict[str, list[float]] = {"adapter": [], "collection": []}
    for _ in range(rounds):
        seconds["adapter"].append(time_steps(adapter_step, steps))
        seconds["collection"].append(time_steps(own_step, steps))
    ratios = [a / c for a, c in zip(seconds["adapter"], seconds["collection"])]
    return {
        "method": method,
        "adapter_ms": 1000 * statistics.median(seconds["adapter"]),
        "collection_ms": 1000 * statistics.median(seconds["collection"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def table(result: dict) -> str:
    """The result as markdown."""
    s = result["settings"]
    lines = [
        f"TorchRec adapter vs compemb's EmbeddingCollection, same tables: {FEATURES} features x {s['ids']:,} ids, "
        f"dim {DIM}, 100x per feature, batch {BATCH:,} one-hot rows, forward + backward (sparse gradients); median "
        f"over {s['rounds']} rounds of {s['steps']} steps; torch {s['torch']}, {s['threads']} threads, {s['date']}.",
        "",
        "| method | adapter ms | collection ms | adapter / collection (min-max) | target | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        met = "yes" if row["ratio"] <= TARGET else "NO"
        lines.append(
            f"| {row['method']} | {row['adapter_ms']:.2f} | {row['collection_ms']:.2f} | "
            f"{row['ratio']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | <= {TARGET} | {met} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run, print the table and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="hash,qr,ce,cce,cafe")
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "torchrec_lookup")
    args = parser.parse_args()
    rows = [measure(method, args.ids, args.rounds, args.steps) for method in args.methods.split(",")]
    result = {
        "rows": rows,
        "target": TARGET,
        "settings": {
            "ids": args.ids,
            "rounds": args.rounds,
            "steps": args.steps,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "date": datetime.date.today().isoformat(),
        },
    }
    text = table(result)
    print(text)
    atomic_write_text(args.output.with_suffix(".md"), text + "\n")
    atomic_write_text(args.output.with_suffix(".json"), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
