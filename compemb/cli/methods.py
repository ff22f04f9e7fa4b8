"""``compemb methods``: every method with its formula and size, or the tables a run on a data set would build."""

from __future__ import annotations

import argparse
import math
from typing import cast

from compemb.cli.units import megabytes
from compemb.feature_methods import any_method
from compemb.registry import summarize_methods


def add_methods_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb methods`` to the command's sub-commands."""
    methods = commands.add_parser("methods", help="list every method with its formula and size")
    methods.add_argument("--num-embeddings", type=int, default=10_000_000, help="ids of the table the sizes are for")
    methods.add_argument("--dim", type=int, default=16, help="embedding dim")
    methods.add_argument("--compression", type=float, default=100, help="the ratio asked of every method")
    methods.add_argument(
        "--data",
        default=None,
        help="instead: the tables a run on this data set would build, each feature's method and bytes",
    )
    methods.add_argument(
        "--method", default="hash", help="with --data: a method, or one per feature ('C1,C2=full;C3=cce-hybrid;*=hash')"
    )
    methods.add_argument(
        "--sharing",
        choices=("per_feature", "shared"),
        default="per_feature",
        help="with --data: a table per feature, or one shared table",
    )
    methods.set_defaults(run=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every method with its parameter formula and its size for one table at one compression; with
    ``--data``, each feature of that data set: its method (``--method``), its table's bytes and ratio."""
    if not (math.isfinite(args.compression) and args.compression >= 1):
        raise ValueError(
            f"--compression must be a ratio >= 1 (full table bytes / stored bytes), got {args.compression:g}"
        )
    if args.data is not None:
        return _feature_methods(args)
    rows = summarize_methods(args.num_embeddings, args.dim, args.compression)
    print(f"Methods for a {args.num_embeddings:,} x {args.dim} table at compression {args.compression:g}")
    print(f"(full fp32 table: {megabytes(args.num_embeddings * args.dim * 4)}; full is shown uncompressed)\n")
    header = (
        f"{'method':<11} {'what':<32} {'parameters':<44} {'floats':>12} {'index':>11} {'memory':>12} {'ratio':>7}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        # floats: the parameters; index: hashes, pointers, id maps, sketches and per-id state (all in memory)
        print(
            f"{row.name:<11} {row.title:<32} {row.formula:<44} {row.num_params:>12,} "
            f"{megabytes(row.memory.total - row.memory.float_bytes):>11} {megabytes(row.memory.total):>12} "
            f"{row.compression:>6.1f}x  {row.note}".rstrip()
        )
    notes = [f"  {row.name}: {row.sizes}" for row in rows if row.sizes]
    if notes:
        print("\nSizes the budget chose:", *notes, sep="\n")
    return 0


def _feature_methods(args: argparse.Namespace) -> int:
    """``compemb methods --data D --method SPEC --compression R``: the tables a run would build, feature by feature
    (sized on the meta device: nothing allocated, so a full Terabyte-sized set is shown in a moment)."""
    from compemb.budget import full_table_bytes
    from compemb.collection import EmbeddingCollection, Feature
    from compemb.data.dataset import open_dataset
    from compemb.embeddings.base import CompressedEmbedding

    manifest, _ = open_dataset(args.data)
    features = [Feature(f"C{i + 1}", n) for i, n in enumerate(manifest["cardinalities"])]
    features += [Feature(bag["name"], int(bag["cardinality"]), bag["pooling"]) for bag in manifest.get("bags", ())]
    budget = {"compression": args.compression} if any_method(args.method, "compresses") else {}
    collection = EmbeddingCollection(features, args.dim, args.method, sharing=args.sharing, device="meta", **budget)
    memory = collection.memory()
    full = {f.name: full_table_bytes(f.num_embeddings, args.dim) for f in features}
    print(
        f"{args.method} over {args.data} at dim {args.dim}, {args.sharing}: tables {megabytes(memory.total)}, "
        f"{sum(full.values()) / memory.total:.1f}x smaller than the full tables ({megabytes(sum(full.values()))})\n"
    )
    header = f"{'feature':<10} {'ids':>13} {'method':<28} {'bytes stored':>14} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, module in collection.embeddings.items():
        table = cast(CompressedEmbedding, module)  # the collection's tables (a ModuleDict types them Module)
        report = memory.per_feature.get(name, table.memory())
        ids = table.num_embeddings or 0
        whole = full.get(name, sum(full.values()))
        asked = collection.methods.get(name, collection.method)
        # a small feature the budget keeps full whatever its method (see EmbeddingCollection)
        kind = asked if table.compresses or asked == "full" else f"full (kept; {asked} asked)"
        print(f"{name:<10} {ids:>13,} {kind:<28} {report.total:>14,} {whole / report.total:>7.1f}x")
    return 0
