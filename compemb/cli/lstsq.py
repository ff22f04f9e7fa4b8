"""``compemb lstsq``: CCE for least squares, its excess loss per iteration against Theorem 3.1's bound."""

from __future__ import annotations

import argparse


def add_lstsq_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb lstsq`` to the command's sub-commands."""
    lstsq = commands.add_parser("lstsq", help="CCE for least squares: excess loss per iteration vs Theorem 3.1")
    lstsq.add_argument("--n", type=int, default=10_000, help="rows of X and Y")
    lstsq.add_argument("--d1", type=int, default=1_000, help="columns of X (rows of T)")
    lstsq.add_argument("--k", type=int, default=100, help="columns of the random block of H (clusters, buckets)")
    lstsq.add_argument("--d2", type=int, default=10, help="columns of Y and T")
    lstsq.add_argument("--iterations", type=int, default=40, help="clustering iterations")
    lstsq.add_argument("--seed", type=int, default=0, help="seeds X, Y and the hashes")
    lstsq.add_argument(
        "--signal",
        type=float,
        default=0.0,
        help="sd of X T_true's entries (default 0: Y is pure noise, the paper's setup)",
    )
    lstsq.add_argument("--noise", type=float, default=1.0, help="sd of the noise added to Y")
    lstsq.add_argument(
        "--out",
        default="",
        metavar="STEM",
        help="also write STEM.md, STEM.json and STEM.png (e.g. benchmarks/results/lstsq); default: "
        "the table on the terminal only",
    )
    lstsq.add_argument(
        "--overwrite",
        action="store_true",
        help="replace STEM.md and STEM.json (and a PNG compemb did not write) where they exist",
    )
    lstsq.set_defaults(run=cmd_lstsq)


def cmd_lstsq(args: argparse.Namespace) -> int:
    """Dense and sparse CCE for least squares against hashing and the Theorem 3.1 bound; table, plot, md/json."""
    from compemb.lstsq import lstsq_table, run_lstsq

    result = run_lstsq(
        args.n,
        args.d1,
        args.k,
        args.d2,
        args.iterations,
        args.seed,
        signal=args.signal,
        noise=args.noise,
        out=args.out or None,
        overwrite=args.overwrite,
    )
    print(lstsq_table(result))
    if args.out:
        print(f"\nwritten: {args.out}.md, {args.out}.json and {args.out}.png")
    return 0
