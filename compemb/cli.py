"""The ``compemb`` command. It parses, calls the library and prints; no training logic lives here."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from compemb import __version__
from compemb.feature_methods import any_method, is_per_feature
from compemb.protocols import PROTOCOLS
from compemb.registry import METHODS, parse_method_spec, summarize_methods
from compemb.train import TrainConfig

# TrainConfig's settings no flag sets: a --config file or a resumed checkpoint may still give them
NOT_ON_THE_COMMAND_LINE = ("eval_split", "eval_batch_size", "checkpoint_epochs")


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:,.2f} MB"


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
    print(f"(full fp32 table: {_megabytes(args.num_embeddings * args.dim * 4)}; full is shown uncompressed)\n")
    header = (
        f"{'method':<11} {'what':<32} {'parameters':<44} {'floats':>12} {'index':>11} {'memory':>12} {'ratio':>7}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        # floats: the parameters; index: hashes, pointers, id maps, sketches and per-id state (all in memory)
        print(
            f"{row.name:<11} {row.title:<32} {row.formula:<44} {row.num_params:>12,} "
            f"{_megabytes(row.memory.total - row.memory.float_bytes):>11} {_megabytes(row.memory.total):>12} "
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

    manifest, _ = open_dataset(args.data)
    features = [Feature(f"C{i + 1}", n) for i, n in enumerate(manifest["cardinalities"])]
    features += [Feature(bag["name"], int(bag["cardinality"]), bag["pooling"]) for bag in manifest.get("bags", ())]
    budget = {"compression": args.compression} if any_method(args.method, "compresses") else {}
    collection = EmbeddingCollection(features, args.dim, args.method, sharing=args.sharing, device="meta", **budget)
    memory = collection.memory()
    full = {f.name: full_table_bytes(f.num_embeddings, args.dim) for f in features}
    print(
        f"{args.method} over {args.data} at dim {args.dim}, {args.sharing}: tables {_megabytes(memory.total)}, "
        f"{sum(full.values()) / memory.total:.1f}x smaller than the full tables ({_megabytes(sum(full.values()))})\n"
    )
    header = f"{'feature':<10} {'ids':>13} {'method':<28} {'bytes stored':>14} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, table in collection.embeddings.items():
        report = memory.per_feature.get(name, table.memory())
        ids = table.num_embeddings or 0
        whole = full.get(name, sum(full.values()))
        asked = collection.methods.get(name, collection.method)
        # a small feature the budget keeps full whatever its method (see EmbeddingCollection)
        kind = asked if table.compresses or asked == "full" else f"full (kept; {asked} asked)"
        print(f"{name:<10} {ids:>13,} {kind:<28} {report.total:>14,} {whole / report.total:>7.1f}x")
    return 0


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


def _byte_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"100000"`` -> bytes (K, M, G, T: powers of 1,024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with K, M, G or T")
    return int(float(match[1]) * units[match[2].upper()])


def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(width) for width in text.split(",") if width)


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model on a preprocessed data set; print the last evaluation."""
    from compemb import distributed
    from compemb.train import Trainer

    overrides = dict(_override(text) for text in args.override)
    config = replace(_train_config(args, args.out), **overrides)
    if args.print_config:  # the settings this command would train with, as a --config file holds them
        from compemb.run_config import config_text

        print(config_text(config), end="")
        return 0
    resume = args.resume or args.resume_or_start or args.resume_from != "last"
    if overrides and not resume:
        raise ValueError("--override changes a setting of the run being resumed: give it with --resume")
    if args.overwrite and resume:
        raise ValueError("--overwrite replaces the run in --out, --resume continues it: give one of them")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be a positive number of processes, got {args.nproc}")
    if args.nproc > 1 and not distributed.launched():  # torchrun starts the ranks, each running this command
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            "compemb",
            *_without_nproc(args.argv),
        ]
        return subprocess.run(command).returncode
    trainer = Trainer(
        config,
        resume=resume,
        start_if_missing=args.resume_or_start,
        resume_from=args.resume_from,
        allow_changes=tuple(overrides),
        overwrite=args.overwrite,
        quiet=args.quiet,
        log_every=args.log_every,
        tensorboard=args.tensorboard,
        trust_unverified=args.trust_unverified,
    )
    result = trainer.fit()
    if distributed.rank() == 0:
        from compemb.run_plot import plot_run

        curves = plot_run(config.out, overwrite=True)  # the run's own curves (a user's file was refused at the start)
        best = trainer.best or result
        print(
            json.dumps({**result, **_costs(trainer)}, indent=2)
            if args.json
            else _summary(result, trainer, config.eval_split)
            + f"\nbest: {config.eval_split} BCE {best['bce']:.4f}, AUC "
            f"{best['auc']:.4f} at step {best['step']:,} (checkpoints/best: what eval, export and --test use)"
            f"\ncurves: {curves}"
        )
    if distributed.launched():  # see exit_rank: a rank's teardown can deadlock in gloo
        distributed.exit_rank(0)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line less its ``--nproc N`` (or ``--nproc=N``): what each rank torchrun starts runs."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            kept.append(word)
    return kept


def _override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--override``, the value typed as the TrainConfig field is (int, float or text)."""
    from compemb.train import OVERRIDABLE

    key, equals, value = text.partition("=")
    if not equals or key not in OVERRIDABLE:
        raise ValueError(f"--override takes KEY=VALUE with KEY one of {', '.join(OVERRIDABLE)}; got {text!r}")
    kind = type(getattr(TrainConfig(data="", out=""), key))
    try:
        return key, kind(value)
    except ValueError:
        raise ValueError(f"--override {key}: {value!r} is not {kind.__name__}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run's best (or last) checkpoint on a split."""
    from compemb.train import Trainer, checkpoint_config

    stem = Path(args.run_dir) / "checkpoints" / args.checkpoint
    if not Path(f"{stem}.json").exists():
        raise ValueError(
            f"{args.run_dir} is not a compemb run with a checkpoint: no checkpoints/{args.checkpoint}.json"
        )
    trainer = Trainer(checkpoint_config(stem), trust_unverified=args.trust_unverified)
    trainer.load(stem)
    result = {"step": trainer.step, **trainer.evaluate(args.split)}
    print(json.dumps({**result, **_costs(trainer)}, indent=2) if args.json else _summary(result, trainer, args.split))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's train loss and validation BCE against the step."""
    from compemb.run_plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out, overwrite=args.overwrite)}")
    return 0


def _summary(result: dict, trainer: Any, split: str) -> str:
    """A run's evaluation as a person reads it: the metrics, then what the tables cost."""
    metrics = f"{split} at step {result.get('step', trainer.step):,}: BCE {result['bce']:.4f}"
    if result.get("bayes_bce") is not None:
        metrics += f" (Bayes {result['bayes_bce']:.4f}, gap {result['gap_to_bayes']:+.2%})"
    metrics += f", AUC {result['auc']:.4f}"
    if "train_loss" in result:
        metrics += f"; train loss {result['train_loss']:.4f}"
    costs, config = _costs(trainer), trainer.config
    stored = costs["table_bytes"]
    asked = f" ({config.compression:g}x asked)" if config.compression else ""
    compressed = (
        f"{costs['ratio']:.1f}x smaller than the full tables{asked}"
        if any_method(config.method, "compresses")
        else "the full tables, uncompressed"
    )
    cost = f"{config.method}: tables {_megabytes(stored)} ({costs['params']:,} params), {compressed}"
    if result.get("samples_per_s"):
        cost += f"; {result['samples_per_s']:,.0f} samples/s"
    return f"{metrics}\n{cost}; run in {config.out}"


def _costs(trainer: Any) -> dict[str, Any]:
    """What a run's tables cost: method, the ratio asked and reached, params, stored and full bytes."""
    from compemb.budget import full_table_bytes

    collection, config = trainer.model.embeddings, trainer.config
    stored = collection.memory().total
    full = sum(full_table_bytes(f.num_embeddings, collection.embedding_dim) for f in collection.features)
    return {
        "method": config.method,
        "compression_asked": config.compression,
        "params": stored // 4,
        "table_bytes": stored,
        "full_table_bytes": full,
        "ratio": full / stored,
    }


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.2f} MB"


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


def _train_config(args: argparse.Namespace, out: str, compression: float | None = None) -> TrainConfig:
    """The TrainConfig the training arguments describe (``--method`` and a one-number ``--compression`` where
    present; sweeps set the compression per run)."""
    # NAME:KEY=VALUE options of --method (train) are checked against the method's own options here
    if compression is None:  # a command's --compression, where it is one number (sweeps take a list)
        given = getattr(args, "compression", None)
        compression = given if isinstance(given, (int, float)) else None
    if args.data is None:
        resume = ", or --resume a run" if getattr(args, "run", None) is cmd_train else ""
        raise ValueError(
            f"give --data (a data set of compemb synth or preprocess) or a --config file that names it{resume}"
        )
    if out is None:
        raise ValueError("give --out (the run directory), or a --config file that names it")
    spec, cluster_every = getattr(args, "method", "full"), getattr(args, "cluster_every", None)
    if is_per_feature(spec):  # "C1,C2=full;*=hash": each part carries its options
        if cluster_every is not None:
            raise ValueError(
                "--cluster-every with a method per feature: give it in the part that clusters (e.g. "
                "'C3=cce:cluster_every=200;*=hash')"
            )
        method, options = spec, {}
    else:
        method, options = parse_method_spec(spec)
        if cluster_every is not None:  # methods that cluster take it; the others drop it
            options.setdefault("cluster_every", cluster_every)
    # a config file's or a resumed checkpoint's settings that no flag sets (eval_split, eval_batch_size, ...)
    settings = {key: value for key, value in getattr(args, "settings", {}).items() if key in NOT_ON_THE_COMMAND_LINE}
    return TrainConfig(
        **settings,
        data=args.data,
        out=out,
        method=method,
        compression=compression,
        num_params=getattr(args, "num_params", None),
        model=args.model,
        embedding_dim=args.dim,
        bottom=_widths(args.bottom),
        top=_widths(args.top),
        optimizer=args.optimizer,
        lr=args.lr,
        table_optimizer=args.table_optimizer,
        table_lr=args.table_lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        eval_every=args.eval_every,
        evals_per_epoch=args.evals_per_epoch,
        seed=args.seed,
        init=args.init,
        sharing=args.sharing,
        shuffle=args.shuffle,
        method_options=options,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        compile=args.compile,
        device=args.device,
        kernels=args.kernels,
        cuda_graph=args.cuda_graph,
    )


def cmd_bench_quality(args: argparse.Namespace) -> int:
    """Sweep methods x compression ratios x seeds; print the table and where the plots went."""
    from compemb.bench.quality import collect_rows, markdown_table, parse_sweep_spec, run_sweep
    from compemb.bench.verdicts import comparison_table, default_baseline

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    for method in methods:
        parse_sweep_spec(method)  # an unknown name or a malformed option fails before any training
    compressions = [float(ratio) for ratio in args.compression.split(",")]
    base = _train_config(args, args.out)
    protocol_baseline = PROTOCOLS[args.protocol].baseline if args.protocol else None
    baseline = args.baseline or (protocol_baseline if protocol_baseline in methods else default_baseline(methods))
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


def cmd_bench_train(args: argparse.Namespace) -> int:
    """DLRM training samples/s of methods as ratios to a baseline method, measured in alternation."""
    from compemb.bench.train_speed import measure_training_speed, write_speed

    base = _train_config(args, args.out)
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

    result = measure_trainer_overhead(_train_config(args, args.out), rounds=args.rounds, steps=args.steps)
    print(write_overhead(result, args.output))
    print(f"written: {args.output}.md and {args.output}.json")
    return 0


def cmd_bench_syncs(args: argparse.Namespace) -> int:
    """Host waits per training step of each method on the device code path (and on CUDA the real syncs)."""
    from compemb import METHODS
    from compemb.bench.syncs import format_syncs, measure_syncs
    from compemb.io import atomic_write_text

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = measure_syncs(_train_config(args, "unused"), methods, warmup=args.warmup, steps=args.steps)
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


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="a preprocessed data set (compemb synth / preprocess)")
    parser.set_defaults(training_parser=parser)  # where --protocol, --config and --resume set their defaults
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="the settings from a TOML (or YAML) file of TrainConfig's fields, as --print-config and "
        "a run's config.toml hold them; flags given beside it win",
    )
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=None,
        help="a paper's settings as the defaults (flags beside it win): dlrm (DLRM's SGD 0.1 for MLPs "
        "and tables, batch 2048, evaluated at the end: compemb's defaults before 2026-12-06), "
        "cafe-paper (SGD 0.1, batch 128, one epoch, one shared table; baseline hash-fields) or "
        "cce-paper (DLRM's SGD 0.1, batch 128, one epoch, validation every 1/6 epoch; baseline ce)",
    )
    parser.add_argument("--model", choices=("dlrm", "dcn"), default="dlrm", help="DLRM or DCN-v2")
    parser.add_argument("--dim", type=int, default=16, help="embedding dim of every feature")
    parser.add_argument("--bottom", default="512,256,64", help="bottom MLP widths (it ends in --dim)")
    parser.add_argument("--top", default="512,256", help="top (DLRM) or deep (DCN) MLP widths")
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "adagrad", "adam", "adam_dense"),
        default="adam",
        help="the MLPs' optimizer (the default recipe, Adam 2e-3 for the MLPs and Adagrad 0.05 for "
        "the tables, is the one nearest the best on every set of benchmarks/results/"
        "default_recipe.md; --protocol dlrm: SGD 0.1 for all)",
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="the MLPs' learning rate")
    parser.add_argument(
        "--table-optimizer",
        choices=("sgd", "adagrad", "rowwise_adagrad", "adam", "adam_dense"),
        default="adagrad",
        help="the tables' own optimizer; sparse gradients for all but adam_dense: adam updates only the "
        "rows a batch touched (compemb.optim.RowAdam), adam_dense every row every step (torch's "
        "Adam); adagrad: an accumulator per element; rowwise_adagrad: one per row (TorchRec's "
        "default: a table's worth less training memory)",
    )
    parser.add_argument("--table-lr", type=float, default=0.05, help="the tables' learning rate")
    parser.add_argument("--batch-size", type=int, default=2048, help="training rows per step")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training split")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N steps and at the end (0: as --evals-per-epoch says)"
    )
    parser.add_argument(
        "--evals-per-epoch",
        type=int,
        default=1,
        help="evaluate exactly N times per epoch, evenly, the last at its end (the CCE paper: 6; 0: "
        "only at the end of the run); the best of them is checkpoints/best",
    )
    parser.add_argument(
        "--init",
        choices=("dlrm", "uniform_dim"),
        default="dlrm",
        help="table init: DLRM's U(+-sqrt(1/n)) per table of n ids, or U(+-1/sqrt(dim))",
    )
    parser.add_argument(
        "--sharing",
        choices=("per_feature", "shared"),
        default="per_feature",
        help="a table per feature sharing the budget, or one table over all features' ids (high ratios)",
    )
    parser.add_argument(
        "--shuffle",
        action="store_true",
        help="train on a seeded permutation of the rows, a new one each epoch (else in file order)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="also a checkpoint every N steps (0: at evaluations, epoch ends and by time)",
    )
    parser.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=5.0,
        metavar="M",
        help="also a checkpoint when M minutes passed since the last (0: never by time)",
    )
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile (MLPs and interaction compiled; needs a C++ compiler)",
    )
    parser.add_argument(
        "--kernels",
        choices=("auto", "torch"),
        default="auto",
        help="auto: compiled kernels on CPU, torch ops on a GPU; torch: the GPU's code path on CPU too",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay the steady training step as one CUDA graph (needs --device cuda)",
    )


def _add_cluster_every(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-every",
        type=int,
        default=None,
        metavar="N",
        help="methods that cluster (cce): cluster every N steps up to 3/4 of the run; 0: never "
        "(default: derived from the run, every epoch and at least every 1/3 of the run)",
    )


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default after its help (none for required options and flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "(default:" in help_text
        ):  # the help says its default itself
            return help_text
        return help_text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`HelpFormatter`; sub-command parsers are made of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:  # name the closest option of the sub-command that was given, in one line
            command = self._command_parser(parsed)
            options = [o for a in command._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
            flag = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=")[0]
            close = difflib.get_close_matches(flag, options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.exit(
                2, f"compemb: error: unrecognized arguments: {' '.join(unknown)}{hint}; see {command.prog} --help\n"
            )
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest sub-command parser the arguments chose (the options a typo should be matched against)."""
        parser: argparse.ArgumentParser = self
        while True:
            action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            chosen = getattr(parsed, action.dest, None) if action else None
            if chosen is None:
                return parser
            parser = action.choices[chosen]  # type: ignore[union-attr]

    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, naming what was wrong: ``compemb: error: ...`` and exit 2 (no usage block)."""
        self.exit(2, f"compemb: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compemb`` command."""
    parser = _Parser(prog="compemb", description="Compressed embedding tables for recommenders.")
    parser.add_argument("--version", action="version", version=f"compemb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

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
    (
        criteo.add_argument(
            "--days",
            action="store_true",
            help="the files are Terabyte days: all but the last train, the last halved into test and val",
        ),
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

    train = commands.add_parser("train", help="train a model on a preprocessed data set")
    _add_training_arguments(train)
    train.add_argument("--out", default=None, help="run directory (checkpoints, metrics.jsonl, train.log, config.toml)")
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings as a --config file (TOML) and exit without training",
    )
    train.add_argument(
        "--method",
        default="full",
        help="a method of `compemb methods`; options as NAME:KEY=VALUE:... (e.g. cce:cluster_every=200)",
    )
    train.add_argument("--compression", type=float, default=None, help="the ratio to compress every table by")
    train.add_argument(
        "--num-params",
        type=int,
        default=None,
        help="the tables' budget in 4-byte floats instead of a ratio (what a budget error names)",
    )
    train.add_argument("--seed", type=int, default=0, help="seeds the tables, the hashes, the MLPs and --shuffle")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its settings (a flag that "
        "differs is refused; --override changes what may change)",
    )
    train.add_argument("--json", action="store_true", help="print the last evaluation as JSON instead of a summary")
    train.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    train.add_argument(
        "--log-every",
        type=int,
        default=100,
        metavar="N",
        help="where stderr is not a terminal: a plain progress line every N steps instead of a bar (0: none)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run --out holds (its checkpoints, metrics.jsonl, train.log and config.toml; "
        "nothing else there)",
    )
    train.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write TensorBoard event files there (train loss, every evaluation); needs the tensorboard package",
    )
    train.add_argument(
        "--resume-or-start",
        action="store_true",
        help="as --resume, but start fresh (saying so) where the run has no checkpoint",
    )
    train.add_argument(
        "--resume-from",
        choices=("last", "previous"),
        default="last",
        help="resume from the checkpoint before the last (when the last is damaged)",
    )
    train.add_argument(
        "--trust-unverified",
        action="store_true",
        help="with --resume: "
        "use a checkpoint whose json records no SHA-256 (edited, or older than compemb's checksums)",
    )
    train.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --resume: change a setting the run may change (lr, epochs, eval_every, ...)",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes (torchrun, DistributedDataParallel; gloo on CPU, nccl on CUDA)",
    )
    _add_cluster_every(train)
    train.set_defaults(run=cmd_train)

    plot = commands.add_parser("plot", help="draw a run's loss and validation curves to a PNG")
    plot.add_argument("--run", dest="run_dir", required=True, help="the run directory")
    plot.add_argument("--out", default=None, help="the PNG to write (default: RUN/curves.png)")
    plot.add_argument("--overwrite", action="store_true", help="replace a PNG compemb did not write at --out")
    plot.set_defaults(run=cmd_plot)

    evaluate = commands.add_parser("eval", help="evaluate a run's checkpoint on a split")
    evaluate.add_argument("--run", dest="run_dir", required=True, help="the run directory")
    evaluate.add_argument("--split", default="test", help="the split to evaluate on (train, val, test)")
    evaluate.add_argument("--json", action="store_true", help="print the evaluation as JSON instead of a summary")
    evaluate.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="the best validation checkpoint or the last one"
    )
    evaluate.add_argument(
        "--trust-unverified",
        action="store_true",
        help="use a checkpoint whose json records no SHA-256 (edited, or older than compemb's checksums)",
    )
    evaluate.set_defaults(run=cmd_eval)

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
        type=_byte_size,
        default=None,
        metavar="SIZE",
        help="refuse a model needing more to load (8G, 512M; default: this machine's memory)",
    )
    predict.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    predict.set_defaults(run=cmd_predict)

    bench = commands.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
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
    speed = benches.add_parser("train", help="DLRM training samples/s as a ratio to a baseline method")
    _add_training_arguments(speed)
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
    overhead = benches.add_parser("trainer", help="compemb train's samples/s against a minimal loop of the same model")
    _add_training_arguments(overhead)
    overhead.add_argument("--method", default="full", help="the method (NAME:KEY=VALUE options as for train)")
    overhead.add_argument("--compression", type=float, default=None, help="the method's ratio (none for full)")
    overhead.add_argument("--seed", type=int, default=0, help="seeds the model")
    overhead.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    overhead.add_argument("--steps", type=int, default=30, help="steps per loop per round")
    overhead.add_argument("--out", default="runs/trainer_overhead", help="the trainer's run directory")
    overhead.add_argument("--output", default="benchmarks/results/trainer", help="results file stem")
    overhead.set_defaults(run=cmd_bench_trainer)
    syncs = benches.add_parser("syncs", help="host waits per training step of every method (the device code path)")
    _add_training_arguments(syncs)
    syncs.add_argument("--methods", default="all", help="comma-separated registry names, or 'all'")
    syncs.add_argument("--compression", type=float, default=100, help="the ratio of every compressed method")
    syncs.add_argument("--seed", type=int, default=0, help="seeds the model")
    syncs.add_argument("--warmup", type=int, default=5, help="steps before counting")
    syncs.add_argument("--steps", type=int, default=30, help="steps counted")
    syncs.add_argument("--output", default=None, help="write OUTPUT.md")
    syncs.set_defaults(run=cmd_bench_syncs)
    quality = benches.add_parser("quality", help="train every method at every ratio; table and plots")
    _add_training_arguments(quality)
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
    _add_cluster_every(quality)
    quality.set_defaults(run=cmd_bench_quality)

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
    return parser


def _layered(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """The arguments with the settings' layers as defaults (compemb.run_config): a ``--protocol``, a ``--config``
    file, then (``train --resume``) the checkpoint's config; the flags given win over all of them."""
    from compemb.run_config import cli_defaults, read_config_file

    training = getattr(args, "training_parser", None)
    if training is None:
        return args
    settings: dict[str, Any] = {}
    if args.protocol:
        from compemb.protocols import get_protocol

        settings.update(get_protocol(args.protocol).settings)
    if args.config:
        settings.update(read_config_file(args.config, TrainConfig))
    if settings:
        training.set_defaults(**cli_defaults(settings))
        args = parser.parse_args(argv)
    resumed = _resumed_settings(args)
    if resumed:
        settings.update(resumed)
        training.set_defaults(**cli_defaults(settings))
        args = parser.parse_args(argv)
    args.settings = settings
    return args


def _resumed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``train --resume``: the config of the checkpoint it resumes from (but ``out``); {} for a fresh run."""
    from compemb.train import find_checkpoint, no_checkpoint, read_config

    if (
        args.run is not cmd_train
        or args.out is None
        or not (args.resume or args.resume_or_start or args.resume_from != "last")
    ):
        return {}
    stem = find_checkpoint(args.out, args.resume_from)
    if stem is None:
        if args.resume_or_start:
            return {}
        raise no_checkpoint(args.out, args.resume_from)
    return {key: value for key, value in read_config(stem).items() if key != "out"}


def _check_bench_outputs(args: argparse.Namespace) -> None:
    """Before a benchmark runs: its result files (``--output STEM``: .md, .json) and run directories (``--out``)
    follow the output rule (no link, device or FIFO replaced, nothing inside a data set or another run). Results
    are regenerated in place: a result file compemb wrote before is replaced, as the benchmark scripts expect."""
    from compemb.outputs import check_output_directory, check_output_file

    if getattr(args, "output", None):
        for suffix in (".md", ".json"):
            check_output_file(f"{args.output}{suffix}", "text", flag="--output", overwrite=True)
    if getattr(args, "out", None):
        check_output_directory(args.out, inputs=[("--data", args.data)] if getattr(args, "data", None) else ())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compemb`` console command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _layered(parser, argv, args)
        args.argv = argv  # train --nproc hands the command line to torchrun
        if getattr(args, "bench", None):
            _check_bench_outputs(args)
        return args.run(args)
    except BrokenPipeError:  # `compemb ... | head` closed the pipe: the reader has what it wanted, as for any filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # what a shell reports for a process ended by SIGPIPE
    except (ValueError, OSError) as error:  # bad input, a missing file, a full disk: one clear line, not a traceback
        print(f"compemb: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
