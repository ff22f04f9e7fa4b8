"""``compemb plot`` and ``compemb eval``: a trained run's curves and evaluation, and the report of a run's metrics and
what its tables cost (``compemb train`` prints it too)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from compemb.cli.units import megabytes
from compemb.feature_methods import any_method


def add_plot_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb plot`` to the command's sub-commands."""
    plot = commands.add_parser("plot", help="draw a run's loss and validation curves to a PNG")
    plot.add_argument("--run", dest="run_dir", required=True, help="the run directory")
    plot.add_argument("--out", default=None, help="the PNG to write (default: RUN/curves.png)")
    plot.add_argument("--overwrite", action="store_true", help="replace a PNG compemb did not write at --out")
    plot.set_defaults(run=cmd_plot)


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb eval`` to the command's sub-commands."""
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
    print(
        json.dumps({**result, **run_costs(trainer)}, indent=2)
        if args.json
        else run_summary(result, trainer, args.split)
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's train loss and validation BCE against the step."""
    from compemb.run_plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out, overwrite=args.overwrite)}")
    return 0


def run_summary(result: dict, trainer: Any, split: str) -> str:
    """A run's evaluation as a person reads it: the metrics, then what the tables cost."""
    metrics = f"{split} at step {result.get('step', trainer.step):,}: BCE {result['bce']:.4f}"
    if result.get("bayes_bce") is not None:
        metrics += f" (Bayes {result['bayes_bce']:.4f}, gap {result['gap_to_bayes']:+.2%})"
    metrics += f", AUC {result['auc']:.4f}"
    if "train_loss" in result:
        metrics += f"; train loss {result['train_loss']:.4f}"
    costs, config = run_costs(trainer), trainer.config
    stored = costs["table_bytes"]
    asked = f" ({config.compression:g}x asked)" if config.compression else ""
    compressed = (
        f"{costs['ratio']:.1f}x smaller than the full tables{asked}"
        if any_method(config.method, "compresses")
        else "the full tables, uncompressed"
    )
    cost = f"{config.method}: tables {megabytes(stored)} ({costs['params']:,} params), {compressed}"
    if result.get("samples_per_s"):
        cost += f"; {result['samples_per_s']:,.0f} samples/s"
    return f"{metrics}\n{cost}; run in {config.out}"


def run_costs(trainer: Any) -> dict[str, Any]:
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
