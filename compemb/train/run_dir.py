"""A run's directory: the files compemb writes there (metrics, log, config, checkpoints) and which of them are a
run's."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from compemb import distributed
from compemb.outputs import check_output_file
from compemb.run_config import CONFIG_FILE, is_run_config
from compemb.run_lock import RunLock, RunLockedError
from compemb.run_plot import CURVES

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


def claim_run_directory(out: Path, overwrite: bool, rank: int) -> None:
    """Before a fresh run writes anything: refuse an ``out`` that holds another run (RunExistsError), or
    (``overwrite``) remove that run's files, and only them (rank 0; every rank calls it)."""
    files = run_files(out)
    log = out / LOG_FILE
    if (log.exists() or log.is_symlink()) and not is_run_log(log):  # a user's file: never appended to or removed
        raise RunExistsError(
            f"{log} is not a log a compemb run wrote: it is left as it is; move it, or give another --out"
        )
    if not overwrite:  # the curves `compemb train` draws at the end would replace a user's PNG
        check_output_file(out / CURVES, "png")
    distributed.barrier()  # every rank has looked before rank 0 removes anything
    if files and not overwrite:
        raise RunExistsError(
            f"{out} holds a run ({', '.join(str(f.relative_to(out)) for f in files[:3])}"
            f"{', ...' if len(files) > 3 else ''}): --resume continues it, --overwrite replaces "
            f"it (Trainer(overwrite=True)), or give another --out"
        )
    if files and rank == 0:
        for path in files:
            path.unlink(missing_ok=True)
    distributed.barrier()


def lock_run_directory(out: Path, rank: int, device: torch.device) -> RunLock:
    """The run directory's lock, held by rank 0 (RunLockedError on every rank where another process holds it); what
    a killed checkpoint write left there is then stale and removed."""
    lock = RunLock(out)
    refused = ""
    if rank == 0:
        try:
            lock.acquire()
        except RunLockedError as error:
            refused = str(error)
    if distributed.active():  # every rank learns whether rank 0 got the lock (else they would wait for it)
        flag = torch.tensor([1 if refused else 0], device=device if device.type == "cuda" else "cpu")
        refused = refused or (
            f"{out} is being trained by another process" if distributed.all_reduce_sum(flag).item() else ""
        )
    if refused:
        raise RunLockedError(refused)
    if rank == 0:  # under the lock no write is under way: what a killed write left is stale
        remove_stale_temporaries(out / CHECKPOINTS)
    return lock
