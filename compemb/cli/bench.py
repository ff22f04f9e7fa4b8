"""``compemb bench``: the benchmarks (lookup speed, training speed, the trainer's overhead, host syncs per step, the
quality sweep), each printing its table and writing its results."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from compemb.cli.training import add_cluster_every, add_training_arguments, train_config
from compemb.protocols import PROTOCOLS
from compemb.registry import METHODS


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb bench`` and its benchmarks to the command's sub-commands."""
    bench = commands.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    _add_lookup_parser(benches)
    _add_train_speed_parser(benches)
    _add_trainer_overhead_parser(benches)
    _add_syncs_parser(benches)
    _add_quality_parser(benches)


def _add_lookup_parser(benches: argparse._SubParsersAction) -> None:
    """``compemb bench lookup``: forward+backward time of every method."""
    lookup = benches.add_parser("lookup", help="forward+backward time as a ratio to the sparse full table")
    lookup.add_argument("--methods", nargs="+", default=None, help="registry names (default: every method)")
    lookup.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    lookup.add_argument("--steps", type=int, default=20, help="lookups per method per round")
    lookup.add_argument("--features", type=int, default=26, help="tables looked up per step")
    lookup.add_argument("--num-embeddings", type=int, default=1_000_000, help="ids per table")
    lookup.add_argument("--compression", type=float, default=100, help="the ratio of every compressed method")
    lookup.add_argument("--seed", type=int, default=0, help="seeds the tables and the ids")
    lookup.add_argument("--device", default="cpu", help="where the tables and ids are (cpu, cuda)")
    lookup.add_argument("--output", default=None, help="write OUTPUT.md and OUTPUT.json")
    lookup.set_defaults(run=cmd_bench_lookup)


def _add_train_speed_parser(benches: argparse._SubParsersAction) -> None:
    """``compemb bench train``: training samples/s of methods as ratios to a baseline."""
    speed = benches.add_parser("train", help="DLRM training samples/s as a ratio to a baseline method")
    add_training_arguments(speed)
    speed.add_argument("--methods", required=True, help="comma-separated registry names")
    speed.add_argument("--baseline", default="hash", help="the method the ratios are to")
    speed.add_argument("--seed", type=int, default=0, help="seeds every run")
    speed.add_argument("--compression", type=float, default=100, help="the ratio of every method")
    speed.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    speed.add_argument("--steps", type=int, default=20, help="steps per method per round")
    speed.add_argument("--targets", default="", help="e.g. cafe=0.9")
    speed.add_argument("--out", default="runs/train-speed", help="run directories")
    speed.add_argument("--output", default="benchmarks/results/train_speed", help="results file stem")
    speed.set_defaults(run=cmd_bench_train)


def _add_trainer_overhead_parser(benches: argparse._SubParsersAction) -> None:
    """``compemb bench trainer``: the trainer against a minimal loop of the same model."""
    overhead = benches.add_parser("trainer", help="compemb train's samples/s against a minimal loop of the same model")
    add_training_arguments(overhead)
    overhead.add_argument("--method", default="full", help="the method (NAME:KEY=VALUE options as for train)")
    overhead.add_argument("--compression", type=float, default=None, help="the method's ratio (none for full)")
    overhead.add_argument("--seed", type=int, default=0, help="seeds the model")
    overhead.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    overhead.add_argument("--steps", type=int, default=30, help="steps per loop per round")
    overhead.add_argument("--out", default="runs/trainer_overhead", help="the trainer's run directory")
    overhead.add_argument("--output", default="benchmarks/results/trainer", help="results file stem")
    overhead.set_defaults(run=cmd_bench_trainer)


def _add_syncs_parser(benches: argparse._SubParsersAction) -> None:
    """``compemb bench syncs``: host waits per training step of every method."""
    syncs = benches.add_parser("syncs", help="host waits per training step of every method (the device code path)")
    add_training_arguments(syncs)
    syncs.add_argument("--methods", default="all", help="comma-separated registry names, or 'all'")
    syncs.add_argument("--compression", type=float, default=100, help="the ratio of every compressed method")
    syncs.add_argument("--seed", type=int, default=0, help="seeds the model")
    syncs.add_argument("--warmup", type=int, default=5, help="steps before counting")
    syncs.add_argument("--steps", type=int, default=30, help="steps counted")
    syncs.add_argument("--output", default=None, help="write OUTPUT.md")
    syncs.set_defaults(run=cmd_bench_syncs)


def _add_quality_parser(benches: argparse._SubParsersAction) -> None:
    """``compemb bench quality``: every method at every ratio over seeds."""
    quality = benches.add_parser("quality", help="train every method at every ratio; table and plots")
    add_training_arguments(quality)
    quality.add_argument(
        "--methods",
        default="all",
        help="comma-separated names, or 'all'; options as NAME:KEY=VALUE:KEY=VALUE (e.g. cce:accounting=paper); NAME+int8 / +int4 / +pq: trained, then quantized",
    )
    quality.add_argument("--compression", default="10,100", help="comma-separated ratios")
    quality.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 of every (method, ratio)")
    quality.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    quality.add_argument(
        "--baseline",
        default=None,
        help="the method spec every verdict compares against (default: hash if swept, else the first)",
    )
    quality.add_argument(
        "--test",
        choices=("welch", "paired"),
        default="welch",
        help="Welch's t-test over seeds, or a paired t-test seed by seed",
    )
    quality.add_argument("--out", required=True, help="the sweep's directory (finished runs are read back)")
    add_cluster_every(quality)
    quality.set_defaults(run=cmd_bench_quality)


def check_bench_outputs(args: argparse.Namespace) -> None:
    """Before a benchmark runs: its result files (``--output STEM``: .md, .json) and run directories (``--out``)
    follow the output rule (no link, device or FIFO replaced, nothing inside a data set or another run). Results
    are regenerated in place: a result file compemb wrote before is replaced, as the benchmark scripts expect."""
    from compemb.outputs import check_output_directory, check_output_file

    if getattr(args, "output", None):
        for suffix in (".md", ".json"):
            check_output_file(f"{args.output}{suffix}", "text", flag="--output", overwrite=True)
    if getattr(args, "out", None):
        check_output_directory(args.out, inputs=[("--data", args.data)] if getattr(args, "data", None) else ())


def cmd_bench_lookup(args: argparse.Namespace) -> int:
    """Time forward+backward of every method against the sparse full table on a Criteo-shaped batch."""
    from compemb.bench.lookup import run_lookup_benchmark, write_results

    result = run_lookup_benchmark(
        methods=args.methods,
        rounds=args.rounds,
        steps=args.steps,
        num_features=args.features,
        num_embeddings=args.num_embeddings,
        seed=args.seed,
        compression=args.compression,
        device=args.device,
    )
    print(result.table())
    if args.output:
        write_results(result, args.output)
        print(f"\nwritten: {args.output}.md and {args.output}.json")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    """DLRM training samples/s of methods as ratios to a baseline method, measured in alternation."""
    from compemb.bench.train_speed import measure_training_speed, write_speed

    base = train_config(args, args.out)
    methods = args.methods.split(",")
    targets = dict(item.split("=") for item in args.targets.split(",")) if args.targets else {}
    rows = measure_training_speed(
        base,
        methods,
        args.baseline,
        rounds=args.rounds,
        steps=args.steps,
        targets={k: float(v) for k, v in targets.items()},
    )
    print(write_speed(rows, base, args.baseline, args.rounds, args.steps, args.output))
    print(f"written: {args.output}.md and {args.output}.json")
    return 0


def cmd_bench_trainer(args: argparse.Namespace) -> int:
    """The trainer's samples/s against a minimal hand-written loop of the same model, measured in alternation."""
    from compemb.bench.trainer import measure_trainer_overhead, write_overhead

    result = measure_trainer_overhead(train_config(args, args.out), rounds=args.rounds, steps=args.steps)
    print(write_overhead(result, args.output))
    print(f"written: {args.output}.md and {args.output}.json")
    return 0


def cmd_bench_syncs(args: argparse.Namespace) -> int:
    """Host waits per training step of each method on the device code path (and on CUDA the real syncs)."""
    from compemb import METHODS
    from compemb.bench.syncs import format_syncs, measure_syncs
    from compemb.io import atomic_write_text

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = measure_syncs(train_config(args, "unused"), methods, warmup=args.warmup, steps=args.steps)
    where = "CUDA" if args.device.startswith("cuda") else "CPU with kernels='torch' (the CUDA code path)"
    text = (
        f"Host waits per training step ({where}; {args.steps} steps after {args.warmup}, steps that cluster or "
        f"reallocate left out; batch {args.batch_size:,}, ratio {args.compression:g}, sharing {args.sharing}; "
        f"model {args.model} dim {args.dim}, bottom {args.bottom}, top {args.top}, {args.optimizer}).\n\n"
        f"Command: `compemb {shlex.join(args.argv)}`\n\n" + format_syncs(rows)
    )
    print(text)
    if args.output:
        atomic_write_text(f"{args.output}.md", text)
        print(f"written: {args.output}.md")
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    """Sweep methods x compression ratios x seeds; print the table and where the plots went."""
    from compemb.bench.quality import collect_rows, markdown_table, parse_sweep_spec, run_sweep
    from compemb.bench.verdicts import comparison_table, default_baseline

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    for method in methods:
        parse_sweep_spec(method)  # an unknown name or a malformed option fails before any training
    compressions = [float(ratio) for ratio in args.compression.split(",")]
    base = train_config(args, args.out)
    protocol_baseline = PROTOCOLS[args.protocol].baseline if args.protocol else None
    baseline = args.baseline or (
        protocol_baseline
        if protocol_baseline is not None and protocol_baseline in methods
        else default_baseline(methods)
    )
    if baseline not in methods:
        raise ValueError(f"--baseline {baseline!r} is not among --methods ({','.join(methods)})")
    run_sweep(base, methods, compressions, args.seeds, args.out, baseline=baseline, test=args.test)
    rows = collect_rows(base, Path(args.out), first=methods)  # with earlier invocations' runs
    print(markdown_table(rows))
    print()
    print(comparison_table(rows, baseline, args.test))
    print(
        f"\nwritten: {args.out}/results.csv, {args.out}/results.md, {args.out}/comparison.md, {args.out}/bce.png, "
        f"{args.out}/auc.png"
    )
    return 0
