"""``compemb export`` and ``compemb predict``: a run's model as one file for inference, and scoring raw lines with it."""

from __future__ import annotations

import argparse
import sys

from compemb.cli.units import byte_size


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb export`` to the command's sub-commands."""
    export = commands.add_parser("export", help="write a run's model as one compact file for inference")
    export.add_argument("--run", dest="run_dir", required=True, help="the run directory")
    export.add_argument("--out", required=True, help="the model file to write (e.g. model.compemb)")
    export.add_argument(
        "--quantize", choices=("int8", "int4", "pq"), default=None, help="quantize the tables first (post-training)"
    )
    export.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="the best validation checkpoint or the last one"
    )
    export.add_argument(
        "--trust-unverified",
        action="store_true",
        help="use a checkpoint whose json records no SHA-256 (edited, or older than compemb's checksums)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a file that is not a compemb model at --out")
    export.set_defaults(run=cmd_export)


def add_predict_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb predict`` to the command's sub-commands."""
    predict = commands.add_parser("predict", help="score a raw Criteo TSV with an exported model")
    predict.add_argument("--model", required=True, help="a file written by compemb export")
    predict.add_argument("--input", required=True, help="raw Criteo TSV (plain or gzip)")
    predict.add_argument(
        "--out", required=True, help="one click probability per input line (nan: rejected line); '-': standard output"
    )
    predict.add_argument(
        "--labeled",
        action="store_true",
        help="the rows start with a label column (train.txt); without it, told by the first line's "
        "field count; with labels, log loss and AUC are printed",
    )
    predict.add_argument(
        "--max-memory",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="refuse a model needing more to load (8G, 512M; default: this machine's memory)",
    )
    predict.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    predict.set_defaults(run=cmd_predict)


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's model as one file for inference; print its size beside the tables' memory()."""
    from compemb.export import export_run

    report = export_run(
        args.run_dir,
        args.out,
        scheme=args.quantize,
        checkpoint=args.checkpoint,
        trust_unverified=args.trust_unverified,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: {report['file_bytes']:,} bytes")
    print(
        f"  embedding tables: memory() {report['embedding_memory_bytes']:,} bytes, stored "
        f"{report['stored_embedding_bytes']:,} (training-only state left out: {len(report['dropped'])} tensors)"
    )
    print(f"  MLPs: {report['mlp_bytes']:,} bytes; vocabulary: {report['vocabulary_bytes']:,} bytes")
    print(f"  it scores {report['reads']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Score a raw Criteo TSV with an exported model: one probability per input line."""
    from compemb.export import predict_file

    counts = predict_file(
        args.model,
        args.input,
        args.out,
        labeled=True if args.labeled else None,
        max_memory=args.max_memory,
        overwrite=args.overwrite,
    )
    report = sys.stderr if args.out == "-" else sys.stdout  # "-": the scores are standard output, the report not
    if counts["labeled"] and not args.labeled:
        print(
            f"{args.input}: its lines start with a label column (40 fields): scored as labelled (--labeled)",
            file=report,
        )
    rejected = (
        f", {counts['rejected']:,} rejected {counts['rejected_by_reason']} (written as nan)"
        if counts["rejected"]
        else ""
    )
    where = "standard output" if args.out == "-" else args.out
    print(f"wrote {where}: {counts['rows_scored']:,} of {counts['rows_read']:,} lines scored{rejected}", file=report)
    if "log_loss" in counts:
        print(f"against the labels: log loss {counts['log_loss']:.4f}, AUC {counts['auc']:.4f}", file=report)
    return 0
