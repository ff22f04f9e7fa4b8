"""The ``compemb`` command. It parses, calls the library and prints; no training logic lives here."""

from __future__ import annotations

import argparse
import sys

from compemb.registry import summarize_methods


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:,.2f} MB"


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every method with its parameter formula and its size for one table at one compression."""
    rows = summarize_methods(args.num_embeddings, args.dim, args.compression)
    print(f"Methods for a {args.num_embeddings:,} x {args.dim} table at compression {args.compression:g}")
    print(f"(full fp32 table: {_megabytes(args.num_embeddings * args.dim * 4)}; full is shown uncompressed)\n")
    header = f"{'method':<11} {'what':<32} {'parameters':<44} {'params':>12} {'index':>8} {'memory':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:<11} {row.title:<32} {row.formula:<44} {row.num_params:>12,} "
            f"{row.memory.index_bytes:>7,}B {_megabytes(row.memory.total):>12} {row.compression:>6.1f}x"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a tiny model with every method on planted random data and print the BCEs."""
    from compemb.demo import run_demo

    results = run_demo(args.methods, compression=args.compression, steps=args.steps, seed=args.seed)
    print(f"\nTiny planted-click task (20,000 ids, dim 16, compression {args.compression:g}, {args.steps} Adam steps)")
    print(f"{'method':<11} {'ratio':>6} {'BCE start':>10} {'BCE end':>9} {'Bayes BCE':>10} {'gap':>7}")
    for r in results:
        gap = (r.final_bce - r.bayes_bce) / r.bayes_bce
        print(
            f"{r.method:<11} {r.compression:>5g}x {r.initial_bce:>10.4f} {r.final_bce:>9.4f} {r.bayes_bce:>10.4f} "
            f"{gap:>6.1%}"
        )
    return 0


def cmd_bench_lookup(args: argparse.Namespace) -> int:
    """Time forward+backward of every method against the sparse full table on a Criteo-shaped batch."""
    from compemb.bench.lookup import run_lookup_benchmark, write_results

    result = run_lookup_benchmark(
        methods=args.methods, rounds=args.rounds, steps=args.steps, num_features=args.features,
        num_embeddings=args.num_embeddings, seed=args.seed,
    )
    print(result.table())
    if args.output:
        write_results(result, args.output)
        print(f"\nwritten: {args.output}.md and {args.output}.json")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate a synthetic Criteo-like data set with its Bayes-optimal BCE and AUC."""
    from compemb.data.synthetic import SyntheticConfig, generate_synthetic

    config = SyntheticConfig(
        rows={"train": args.train_rows, "val": args.eval_rows, "test": args.eval_rows}, scale=args.scale,
        zipf=args.zipf, signal=args.signal, seed=args.seed,
    )
    facts = generate_synthetic(args.out, config)
    print(f"wrote {args.out}: {sum(config.cardinalities()):,} ids over 26 features")
    print(f"{'split':<6} {'rows':>10} {'click rate':>11} {'Bayes BCE':>10} {'Bayes AUC':>10}")
    for split, bayes in facts["bayes"].items():
        print(f"{split:<6} {config.rows[split]:>10,} {bayes['click_rate']:>11.4f} {bayes['bce']:>10.4f} {bayes['auc']:>10.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compemb`` command."""
    parser = argparse.ArgumentParser(prog="compemb", description="Compressed embedding tables for recommenders.")
    commands = parser.add_subparsers(dest="command", required=True)

    methods = commands.add_parser("methods", help="list every method with its formula and size")
    methods.add_argument("--num-embeddings", type=int, default=10_000_000)
    methods.add_argument("--dim", type=int, default=16)
    methods.add_argument("--compression", type=float, default=100)
    methods.set_defaults(run=cmd_methods)

    demo = commands.add_parser("demo", help="train a tiny model with every method on planted random data")
    demo.add_argument("--methods", nargs="+", default=None)
    demo.add_argument("--compression", type=float, default=10)
    demo.add_argument("--steps", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)

    synth = commands.add_parser("synth", help="generate synthetic Criteo-like data with a known best loss")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--train-rows", type=int, default=2_000_000)
    synth.add_argument("--eval-rows", type=int, default=100_000, help="rows of the val and of the test split")
    synth.add_argument("--scale", type=float, default=1e-3, help="Criteo Kaggle cardinalities x this")
    synth.add_argument("--zipf", type=float, default=1.1)
    synth.add_argument("--signal", type=float, default=2.0, help="sd of the teacher's logit")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=cmd_synth)

    bench = commands.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    lookup = benches.add_parser("lookup", help="forward+backward time as a ratio to the sparse full table")
    lookup.add_argument("--methods", nargs="+", default=None)
    lookup.add_argument("--rounds", type=int, default=7)
    lookup.add_argument("--steps", type=int, default=20)
    lookup.add_argument("--features", type=int, default=26)
    lookup.add_argument("--num-embeddings", type=int, default=1_000_000)
    lookup.add_argument("--seed", type=int, default=0)
    lookup.add_argument("--output", default=None, help="write OUTPUT.md and OUTPUT.json")
    lookup.set_defaults(run=cmd_bench_lookup)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compemb`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad user input: one clear line, not a traceback
        print(f"compemb: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
