"""``compemb train``: train one model on a preprocessed data set (on N processes through torchrun), print the last
evaluation."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

from compemb.cli.runs import run_costs, run_summary
from compemb.cli.training import add_cluster_every, add_training_arguments, train_config
from compemb.train import TrainConfig


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``compemb train`` to the command's sub-commands: the training flags, then train's own."""
    train = commands.add_parser("train", help="train a model on a preprocessed data set")
    add_training_arguments(train)
    _add_run_arguments(train)
    _add_output_arguments(train)
    _add_resume_arguments(train)
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes (torchrun, DistributedDataParallel; gloo on CPU, nccl on CUDA)",
    )
    add_cluster_every(train)
    train.set_defaults(run=cmd_train)


def _add_run_arguments(train: argparse.ArgumentParser) -> None:
    """The run: its directory, what it trains (method, budget, seed), or that it continues (``--resume``)."""
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


def _add_output_arguments(train: argparse.ArgumentParser) -> None:
    """What the run prints and writes besides its checkpoints."""
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


def _add_resume_arguments(train: argparse.ArgumentParser) -> None:
    """How a run resumes: from which checkpoint, trusting what, changing which settings."""
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


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model on a preprocessed data set; print the last evaluation."""
    from compemb import distributed
    from compemb.train import Trainer

    overrides = dict(_override(text) for text in args.override)
    config = replace(train_config(args, args.out), **overrides)
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
            json.dumps({**result, **run_costs(trainer)}, indent=2)
            if args.json
            else run_summary(result, trainer, config.eval_split)
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
