"""The settings under the flags, in layers: a ``--protocol``, a ``--config`` file, then (``train --resume``) the
config of the checkpoint the run continues from."""

from __future__ import annotations

import argparse
from typing import Any

from compemb.cli.training import is_train_command
from compemb.train import TrainConfig


def layered_settings(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
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
        not is_train_command(args)
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
