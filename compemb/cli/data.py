"""``compemb synth`` and ``compemb preprocess``: the data sets a run trains on, generated or made from raw logs."""

from __future__ import annotations

import argparse


def add_synth_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb synth`` to the command's sub-commands."""
    synth = commands.add_parser("synth", help="generate synthetic Criteo-like data with a known best loss")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument(
        "--overwrite", action="store_true", help="replace the compemb data set --out holds (and the file at --tsv)"
    )
    synth.add_argument("--train-rows", type=int, default=2_000_000, help="rows of the train split")
    synth.add_argument("--eval-rows", type=int, default=100_000, help="rows of the val and of the test split")
    synth.add_argument("--scale", type=float, default=1e-3, help="Criteo Kaggle cardinalities x this")
    synth.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of every feature's id frequencies")
    synth.add_argument("--signal", type=float, default=2.0, help="sd of the teacher's logit")
    synth.add_argument("--seed", type=int, default=0, help="seeds the teacher and the rows")
    synth.add_argument(
        "--tsv",
        default=None,
        help="also write the rows as Criteo TSV to this file (.gz: gzip), splits in order train, val, test",
    )
    synth.add_argument(
        "--bags",
        type=int,
        default=0,
        help="multi-hot features B1.. (each row a bag of 0..--bag-size ids, pooled by mean)",
    )
    synth.add_argument("--bag-size", type=int, default=5, help="the most ids a row's bag holds")
    synth.add_argument(
        "--drift",
        type=float,
        default=0.0,
        metavar="F",
        help="popularity drifts gradually along the stream (train, val, test): by its end at least a "
        "share F of every feature's top-1%% ids (one id at least) has left the top 1%% (0: none)",
    )
    synth.add_argument(
        "--new-ids",
        type=float,
        default=0.0,
        metavar="N",
        help="a share N of every feature's ids arrive along the stream, never drawn before their "
        "arrival (those arriving after the train split are never seen in training)",
    )
    synth.add_argument(
        "--premise",
        choices=("none", "hot", "clusters"),
        default="none",
        help="plant a founding method's premise: hot (a few popular ids per feature with strong, "
        "distinct effects, a weak tail: CAFE's) or clusters (ids in tight clusters of identical "
        "behaviour: CCE's)",
    )
    synth.add_argument(
        "--hot-ids", type=int, default=8, help="--premise hot: strong ids per feature (its most popular)"
    )
    synth.add_argument(
        "--clusters",
        type=int,
        default=16,
        help="clusters of ids per feature (their behaviour; with --premise clusters, exactly)",
    )
    synth.set_defaults(run=cmd_synth)


def add_preprocess_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb preprocess criteo`` and ``compemb preprocess avazu`` to the command's sub-commands."""
    preprocess = commands.add_parser("preprocess", help="raw click logs to the preprocessed format")
    sources = preprocess.add_subparsers(dest="source_kind", required=True)
    criteo = sources.add_parser("criteo", help="Criteo Kaggle train.txt or Terabyte day_0 ... day_23 (plain or gzip)")
    criteo.add_argument(
        "source",
        nargs="+",
        help="train.txt (split as DLRM splits Kaggle); with --days the Terabyte days in order (last "
        "day: test + val); with --val/--test the training files",
    )
    criteo.add_argument("--val", default=None, help="your own validation file (with --test): written as it is")
    criteo.add_argument("--test", default=None, help="your own test file (with --val): written as it is")
    criteo.add_argument(
        "--days",
        action="store_true",
        help="the files are Terabyte days: all but the last train, the last halved into test and val",
    )
    criteo.add_argument("--unlabeled", default=None, help="Kaggle test.txt (no labels): the split 'unlabeled'")
    criteo.add_argument("--out", required=True, help="output directory")
    criteo.add_argument("--overwrite", action="store_true", help="replace the compemb data set --out holds")
    criteo.add_argument("--min-count", type=int, default=3, help="rarer values share one id per feature")
    criteo.add_argument("--hash-mod", type=int, default=None, help="ids = value mod M instead of categorifying")
    criteo.add_argument("--strict", action="store_true", help="stop at the first bad row (reads in one process)")
    criteo.add_argument(
        "--processes", type=int, default=None, help="worker processes for both passes (default: the cores, at most 8)"
    )
    criteo.set_defaults(run=cmd_preprocess_criteo)

    avazu = sources.add_parser("avazu", help="Avazu CSV with its header")
    avazu.add_argument("source", help="the CSV file")
    avazu.add_argument("--out", required=True, help="output directory")
    avazu.add_argument("--overwrite", action="store_true", help="replace the compemb data set --out holds")
    avazu.add_argument("--min-count", type=int, default=3, help="rarer values share one id per feature")
    avazu.add_argument("--strict", action="store_true", help="stop at the first bad row")
    avazu.set_defaults(run=cmd_preprocess_avazu)


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate a synthetic Criteo-like data set with its Bayes-optimal BCE and AUC."""
    from compemb.data.synthetic import SyntheticConfig, generate_synthetic

    config = SyntheticConfig(
        rows={"train": args.train_rows, "val": args.eval_rows, "test": args.eval_rows},
        scale=args.scale,
        zipf=args.zipf,
        signal=args.signal,
        seed=args.seed,
        bag_features=args.bags,
        bag_size=args.bag_size,
        drift=args.drift,
        new_ids=args.new_ids,
        premise=args.premise,
        hot_ids=args.hot_ids,
        clusters=args.clusters,
    )
    facts = generate_synthetic(args.out, config, tsv=args.tsv, overwrite=args.overwrite)
    bags = f" and {args.bags} multi-hot features" if args.bags else ""
    print(f"wrote {args.out}: {sum(config.cardinalities()):,} ids over 26 features{bags}")
    print(f"{'split':<6} {'rows':>10} {'click rate':>11} {'Bayes BCE':>10} {'Bayes AUC':>10}")
    for split, bayes in facts["bayes"].items():
        print(
            f"{split:<6} {config.rows[split]:>10,} {bayes['click_rate']:>11.4f} {bayes['bce']:>10.4f} {bayes['auc']:>10.4f}"
        )
    return 0


def cmd_preprocess_criteo(args: argparse.Namespace) -> int:
    """Preprocess Criteo TSV (Kaggle train.txt, or Terabyte days in order); print kept and rejected counts."""
    from compemb.data.criteo import preprocess_criteo

    facts = preprocess_criteo(
        args.source,
        args.out,
        min_count=args.min_count,
        hash_mod=args.hash_mod,
        strict=args.strict,
        unlabeled=args.unlabeled,
        processes=args.processes,
        val=args.val,
        test=args.test,
        days=args.days,
        overwrite=args.overwrite,
    )
    _print_preprocessed(facts, args.out)
    return 0


def cmd_preprocess_avazu(args: argparse.Namespace) -> int:
    """Preprocess an Avazu CSV; print kept and rejected counts."""
    from compemb.data.avazu import preprocess_avazu

    _print_preprocessed(
        preprocess_avazu(args.source, args.out, min_count=args.min_count, strict=args.strict, overwrite=args.overwrite),
        args.out,
    )
    return 0


def _print_preprocessed(facts: dict, out: str) -> None:
    rejected = facts["rejected"]
    print(
        f"read {facts['rows_read']:,} rows: kept {facts['rows_kept']:,}, rejected {rejected['total']:,}"
        + (f" {rejected['by_reason']} (first lines: {rejected['first_lines']})" if rejected["total"] else "")
    )
    if len(facts.get("files", {})) > 1:  # each input's own count
        for path, counts in facts["files"].items():
            print(f"  {path}: kept {counts['kept']:,}, rejected {counts['rejected']:,}")
    if "rows" in facts:
        print("splits: " + ", ".join(f"{split} {rows:,}" for split, rows in facts["rows"].items()))
    print(f"wrote {out}")
