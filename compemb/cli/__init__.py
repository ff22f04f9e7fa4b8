"""The ``compemb`` command. It parses, calls the library and prints; no training logic lives here.

A module per group of sub-commands, each with its ``add_<name>_parser`` and its ``cmd_<name>`` functions:
:mod:`~compemb.cli.methods`, :mod:`~compemb.cli.data` (synth, preprocess), :mod:`~compemb.cli.train`,
:mod:`~compemb.cli.runs` (plot, eval), :mod:`~compemb.cli.export` (export, predict), :mod:`~compemb.cli.bench` and
:mod:`~compemb.cli.lstsq`. The flags the training commands share are in :mod:`~compemb.cli.training`, the settings'
layers under the flags in :mod:`~compemb.cli.settings`, the parser class in :mod:`~compemb.cli.parser`.
"""

from __future__ import annotations

import argparse
import os
import sys

from compemb import __version__
from compemb.cli.bench import (
    add_bench_parser,
    check_bench_outputs,
    cmd_bench_lookup,
    cmd_bench_quality,
    cmd_bench_syncs,
    cmd_bench_train,
    cmd_bench_trainer,
)
from compemb.cli.data import (
    add_preprocess_parser,
    add_synth_parser,
    cmd_preprocess_avazu,
    cmd_preprocess_criteo,
    cmd_synth,
)
from compemb.cli.export import add_export_parser, add_predict_parser, cmd_export, cmd_predict
from compemb.cli.lstsq import add_lstsq_parser, cmd_lstsq
from compemb.cli.methods import add_methods_parser, cmd_methods
from compemb.cli.parser import CommandParser, HelpFormatter
from compemb.cli.runs import add_eval_parser, add_plot_parser, cmd_eval, cmd_plot
from compemb.cli.settings import layered_settings
from compemb.cli.train import add_train_parser, cmd_train
from compemb.cli.training import NOT_ON_THE_COMMAND_LINE

__all__ = [
    "NOT_ON_THE_COMMAND_LINE",
    "HelpFormatter",
    "build_parser",
    "cmd_bench_lookup",
    "cmd_bench_quality",
    "cmd_bench_syncs",
    "cmd_bench_train",
    "cmd_bench_trainer",
    "cmd_eval",
    "cmd_export",
    "cmd_lstsq",
    "cmd_methods",
    "cmd_plot",
    "cmd_predict",
    "cmd_preprocess_avazu",
    "cmd_preprocess_criteo",
    "cmd_synth",
    "cmd_train",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compemb`` command."""
    parser = CommandParser(prog="compemb", description="Compressed embedding tables for recommenders.")
    parser.add_argument("--version", action="version", version=f"compemb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_methods_parser(commands)
    add_synth_parser(commands)
    add_preprocess_parser(commands)
    add_train_parser(commands)
    add_plot_parser(commands)
    add_eval_parser(commands)
    add_export_parser(commands)
    add_predict_parser(commands)
    add_bench_parser(commands)
    add_lstsq_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compemb`` console command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = layered_settings(parser, argv, args)
        args.argv = argv  # train --nproc hands the command line to torchrun
        if getattr(args, "bench", None):
            check_bench_outputs(args)
        return args.run(args)
    except BrokenPipeError:  # `compemb ... | head` closed the pipe: the reader has what it wanted, as for any filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # what a shell reports for a process ended by SIGPIPE
    except (ValueError, OSError) as error:  # bad input, a missing file, a full disk: one clear line, not a traceback
        print(f"compemb: error: {error}", file=sys.stderr)
        return 2
