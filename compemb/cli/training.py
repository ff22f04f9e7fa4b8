"""The flags every training command shares and the TrainConfig they describe (train, bench train / trainer /
syncs / quality)."""

from __future__ import annotations

import argparse
from typing import Any

from compemb.feature_methods import is_per_feature
from compemb.protocols import PROTOCOLS
from compemb.registry import parse_method_spec
from compemb.train import TrainConfig

# TrainConfig's settings no flag sets: a --config file or a resumed checkpoint may still give them
NOT_ON_THE_COMMAND_LINE = ("eval_split", "eval_batch_size", "checkpoint_epochs")


def is_train_command(args: argparse.Namespace) -> bool:
    """Whether the arguments are ``compemb train``'s: the one command that resumes a run."""
    return getattr(args, "command", None) == "train"


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every training command shares (train, bench train / trainer / syncs / quality): the settings
    of a TrainConfig, in the order ``--help`` lists them."""
    _add_settings_sources(parser)
    _add_model_arguments(parser)
    _add_optimizer_arguments(parser)
    _add_step_arguments(parser)
    _add_table_and_row_arguments(parser)
    _add_checkpoint_arguments(parser)
    _add_execution_arguments(parser)


def _add_settings_sources(parser: argparse.ArgumentParser) -> None:
    """Where the settings come from: the data set, a ``--config`` file, a paper's ``--protocol``."""
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


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model: DLRM or DCN-v2, the embedding dim, the MLPs' widths."""
    parser.add_argument("--model", choices=("dlrm", "dcn"), default="dlrm", help="DLRM or DCN-v2")
    parser.add_argument("--dim", type=int, default=16, help="embedding dim of every feature")
    parser.add_argument("--bottom", default="512,256,64", help="bottom MLP widths (it ends in --dim)")
    parser.add_argument("--top", default="512,256", help="top (DLRM) or deep (DCN) MLP widths")


def _add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimizers and learning rates of the MLPs and of the tables."""
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


def _add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The steps: rows per step, epochs, and when to evaluate."""
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


def _add_table_and_row_arguments(parser: argparse.ArgumentParser) -> None:
    """The tables' init and sharing, and the order of the training rows."""
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


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """When to write a checkpoint besides evaluations and epoch ends."""
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


def _add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how a step runs: the device, torch.compile, the kernels, CUDA graphs."""
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


def add_cluster_every(parser: argparse.ArgumentParser) -> None:
    """Add ``--cluster-every`` (train, bench quality): how often the methods that cluster do."""
    parser.add_argument(
        "--cluster-every",
        type=int,
        default=None,
        metavar="N",
        help="methods that cluster (cce): cluster every N steps up to 3/4 of the run; 0: never "
        "(default: derived from the run, every epoch and at least every 1/3 of the run)",
    )


def train_config(args: argparse.Namespace, out: str, compression: float | None = None) -> TrainConfig:
    """The TrainConfig the training arguments describe (``--method`` and a one-number ``--compression`` where
    present; sweeps set the compression per run)."""
    # NAME:KEY=VALUE options of --method (train) are checked against the method's own options here
    if compression is None:  # a command's --compression, where it is one number (sweeps take a list)
        given = getattr(args, "compression", None)
        compression = given if isinstance(given, (int, float)) else None
    if args.data is None:
        resume = ", or --resume a run" if is_train_command(args) else ""
        raise ValueError(
            f"give --data (a data set of compemb synth or preprocess) or a --config file that names it{resume}"
        )
    if out is None:
        raise ValueError("give --out (the run directory), or a --config file that names it")
    spec, cluster_every = getattr(args, "method", "full"), getattr(args, "cluster_every", None)
    options: dict[str, Any]  # the method's NAME:KEY=VALUE options
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


def _widths(text: str) -> tuple[int, ...]:
    """An MLP's widths as its flag gives them: ``"512,256"`` -> ``(512, 256)``."""
    return tuple(int(width) for width in text.split(",") if width)
