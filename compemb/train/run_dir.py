"""A run's directory: the files compemb writes there (metrics, log, config, checkpoints) and which of them are a
run's."""

from __future__ import annotations

import os
import re
from pathlib import Path

from compemb.run_config import CONFIG_FILE, is_run_config

CHECKPOINTS = "checkpoints"
LOG_FILE = "train.log"  # the run's progress and evaluation lines, as printed, with the time
# checkpoints/<name>.{safetensors,json}: the newest, one being written, the one before, the best validation one
LAST, NEXT, PREVIOUS, BEST = "last", "next", "previous", "best"


class RunExistsError(ValueError):
    """A fresh run asked to write into a directory that holds another run's checkpoints or metrics."""


def run_files(run: str | os.PathLike) -> list[Path]:
    """The files of a run compemb wrote in ``run`` (its metrics and checkpoints, finished or half-written)."""
    directory = Path(run)
    stems = [directory / CHECKPOINTS / name for name in (LAST, NEXT, PREVIOUS, BEST)]
    # train.log and config.toml only where compemb wrote them: a user's file of that name is not the run's
    ours = [
        path
        for path, written in ((directory / LOG_FILE, is_run_log), (directory / CONFIG_FILE, is_run_config))
        if written(path)
    ]
    candidates = [
        directory / "metrics.jsonl",
        *ours,
        *(Path(f"{stem}{suffix}") for stem in stems for suffix in (".safetensors", ".json")),
    ]
    return [path for path in candidates if path.is_file()]


def is_run_log(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run's train.log as compemb writes it (its first line a time and a train or eval line),
    not a user's file of that name."""
    try:
        with open(path, encoding="utf-8") as file:
            first = file.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (train|eval) ", first) is not None


def remove_stale_temporaries(directory: Path) -> None:
    """The temporary files (``.NAME.XXXX``, see :mod:`compemb.io`) of checkpoint writes that a kill interrupted."""
    if not directory.is_dir():
        return
    names = [f"{stem}{suffix}" for stem in (LAST, NEXT, PREVIOUS, BEST) for suffix in (".safetensors", ".json")]
    for path in directory.iterdir():
        if path.is_file() and any(path.name.startswith(f".{name}.") for name in names):
            path.unlink(missing_ok=True)
