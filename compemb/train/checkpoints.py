"""Checkpoints: reading and verifying them (SHA-256, step, schema), finding the one to resume from, their config."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from compemb.io import atomic_path, atomic_write_text, sha256_of_file
from compemb.train.config import OVERRIDABLE, RESULT_NEUTRAL, TrainConfig, settings_that_differ, with_defaults
from compemb.train.run_dir import CHECKPOINTS, LAST, NEXT, PREVIOUS

# tests: a process whose checkpoint of this step is being written kills itself between its two files
KILL_WHILE_WRITING = "COMPEMB_TEST_KILL_WHILE_WRITING_STEP"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, damaged, or of another config); the message says why."""


def is_complete(stem: Path) -> bool:
    return Path(f"{stem}.safetensors").is_file() and Path(f"{stem}.json").is_file()


# the fields a checkpoint's json holds and their JSON types: anything else is refused by name (a checkpoint of a
# newer compemb, or an edited one) before any of it is used
CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "step": (int,),
    "best": (dict, type(None)),
    "running_loss": (int, float),
    "optimizer_groups": (list,),
    "optimizer_scalars": (dict,),
    "sha256": (str,),
}
TRUST_UNVERIFIED = "--trust-unverified"


def read_meta(stem: Path) -> dict[str, Any]:
    """A checkpoint's json, checked against :data:`CHECKPOINT_FIELDS` (CheckpointError naming what is wrong)."""
    try:
        if not Path(f"{stem}.json").is_file():  # a FIFO there would block the read forever
            raise OSError("not a regular file" if Path(f"{stem}.json").exists() else "missing")
        meta = json.loads(Path(f"{stem}.json").read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"checkpoint {stem}.json is damaged ({error}){previous_offer(stem)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {stem}.json is damaged (a JSON {type(meta).__name__}, not an object)")
    unknown = sorted(set(meta) - set(CHECKPOINT_FIELDS))
    if unknown:
        raise CheckpointError(
            f"checkpoint {stem}.json has fields this compemb does not know ({', '.join(unknown)}): "
            f"written by a newer compemb, or edited"
        )
    for name, types in CHECKPOINT_FIELDS.items():
        if name == "sha256" and name not in meta:
            continue  # decided where the tensors are read: refused unless the user trusts them
        if name not in meta or not isinstance(meta[name], types) or isinstance(meta[name], bool):
            found = "missing" if name not in meta else f"a {type(meta[name]).__name__}"
            raise CheckpointError(
                f"checkpoint {stem}.json is damaged: {name!r} is {found}, not {' or '.join(t.__name__ for t in types)}"
            )
    if meta["step"] < 0:
        raise CheckpointError(f"checkpoint {stem}.json is damaged: step {meta['step']} is negative")
    return meta


def checkpoint_config(stem: str | os.PathLike, meta: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig a checkpoint was saved with (settings added since at their defaults), validated as a
    command line's; CheckpointError naming an unknown or invalid setting."""
    stem = Path(stem)
    saved = (meta if meta is not None else read_meta(stem))["config"]
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise CheckpointError(
            f"checkpoint {stem}.json has settings this compemb does not know "
            f"({', '.join(unknown)}): written by a newer compemb, or edited"
        )
    try:
        return TrainConfig(**with_defaults(saved))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {stem}.json has an invalid config: {error}") from None


def load_model_state(model: torch.nn.Module, tensors: dict[str, Tensor], stem: str | os.PathLike) -> None:
    """Load a checkpoint's ``model.*`` tensors into ``model``; CheckpointError where they do not fit the model its
    config describes (an edited method, dim or size)."""
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) or lines[0]
        raise CheckpointError(
            f"checkpoint {stem}: its tensors do not fit the model its config describes ({detail})"
        ) from None


def read_checkpoint(
    stem: str | os.PathLike, trust_unverified: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and json of a checkpoint, verified: the json's fields, the tensors file's SHA-256 against the
    one the json records, and the step both record; CheckpointError naming the file where any fails. A checkpoint
    whose json records no SHA-256 (edited, or older than compemb's checksums) is read only ``trust_unverified``."""
    stem = Path(stem)
    meta = read_meta(stem)
    path = Path(f"{stem}.safetensors")
    if "sha256" not in meta and not trust_unverified:
        raise CheckpointError(
            f"checkpoint {stem}.json records no SHA-256 of its tensors, so they cannot be "
            f"verified (edited, or written before compemb kept checksums); {TRUST_UNVERIFIED} "
            f"uses them anyway"
        )
    try:
        if not path.is_file():  # a FIFO or device there would block or stream forever
            raise ValueError("not a regular file" if path.exists() else "missing")
        if "sha256" in meta and sha256_of_file(path) != meta["sha256"]:
            raise ValueError(f"its bytes do not match the SHA-256 recorded in {stem.name}.json")
        with safe_open(str(path), framework="pt") as opened:  # tensor by tensor from the mapped file: no bytes copy
            tensors = {name: opened.get_tensor(name) for name in opened.keys()}
        step = tensors_step(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged ({error}){previous_offer(stem)}") from None
    if step is not None and step != meta["step"]:
        raise CheckpointError(
            f"checkpoint {stem}: its tensors are of step {step} and its json of step "
            f"{meta['step']}{previous_offer(stem)}"
        )
    return tensors, meta


def previous_offer(stem: Path) -> str:
    previous = stem.parent / PREVIOUS
    if stem.name != PREVIOUS and is_complete(previous):
        try:
            step = json.loads(Path(f"{previous}.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return ""
        return f"; the previous checkpoint (step {step}) is intact: resume from it with --resume-from previous"
    return "; no earlier checkpoint is kept" if stem.name != PREVIOUS else ""


def tensors_step(path: str | os.PathLike) -> int | None:
    """The step a checkpoint's safetensors file records in its metadata (its header alone is read); None for a
    checkpoint written before compemb recorded it."""
    with safe_open(str(path), framework="pt") as opened:
        step = (opened.metadata() or {}).get("step")
    return None if step is None else int(step)


def step_of(stem: Path) -> int | None:
    """The step both files of a checkpoint record, or None if either is unreadable or they differ."""
    if not is_complete(stem):  # regular files only: opening a FIFO would block
        return None
    try:
        in_tensors = tensors_step(f"{stem}.safetensors")  # None (an older checkpoint): not comparable
        json_step = json.loads(Path(f"{stem}.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return in_tensors if in_tensors == json_step else None


def no_checkpoint(run: str | os.PathLike, which: str = LAST) -> CheckpointError:
    """The error of a resume that finds no checkpoint in ``run``."""
    return CheckpointError(
        f"{run}: no checkpoint to resume from (checkpoints/{which}.*); --resume-or-start starts a "
        f"fresh run where there is none"
    )


def read_config(stem: str | os.PathLike) -> dict[str, Any]:
    """The config a checkpoint (its stem, as :func:`find_checkpoint` gives it) was saved with, with any setting
    added since at its default; CheckpointError where its JSON is damaged."""
    return with_defaults(read_meta(Path(stem))["config"])


def find_checkpoint(run: str | os.PathLike, which: str = LAST) -> Path | None:
    """The stem of a run's checkpoint to resume from; None when the run has none.

    ``which="last"``: the newest complete one: ``last``, or ``next`` where a crash stopped a write after it was
    complete, or ``previous`` where it stopped between the two renames; a ``last`` that is damaged is returned as
    it is (loading it names the damage and offers ``previous``). ``which="previous"``: the one before.
    """
    directory = Path(run) / CHECKPOINTS
    if which != LAST:
        return directory / which if is_complete(directory / which) else None
    steps = [(step, directory / name) for name in (LAST, NEXT) if (step := step_of(directory / name)) is not None]
    if steps:
        return max(steps)[1]
    for name in (LAST, PREVIOUS):
        if is_complete(directory / name):
            return directory / name
    return None


def write_checkpoint(
    stem: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], step: int
) -> None:
    """Write ``stem.safetensors`` (the model's and the optimizer's tensors, the RNG state) and ``stem.json``
    (``meta``: config, step, best, running loss; with the optimizer's groups and scalars), each atomically."""
    tensors = {f"model.{name}": value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "optimizer_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars}
    stem.parent.mkdir(parents=True, exist_ok=True)
    # the step in both files: a pair from two different checkpoints is refused on load; the tensors' file's
    # SHA-256 in the json: damaged bytes are refused too, instead of resuming into whatever they decode to
    # written from the tensors' own memory (no serialized copy: a full table's checkpoint costs no second
    # table), hashed in chunks; the json is published first and the tensors last, so a failed json write
    # leaves neither (a kill between the two renames gives a pair of two steps, refused on load)
    with atomic_path(f"{stem}.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"step": str(step)})
        meta["sha256"] = sha256_of_file(temporary)
        if os.environ.get(KILL_WHILE_WRITING) == str(step):  # the crash test's hook: die mid-checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_text(f"{stem}.json", json.dumps(meta, indent=2) + "\n")


def restore_checkpoint(
    stem: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trust_unverified: bool = False
) -> dict[str, Any]:
    """Load a verified checkpoint's model, optimizer and RNG state; return its json (CheckpointError if damaged or
    if its pieces do not fit ``model`` and ``optimizer``)."""
    tensors, meta = read_checkpoint(stem, trust_unverified)
    load_model_state(model, tensors, stem)
    try:  # verified bytes, but json a person may have edited and re-signed: its pieces must still fit
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in meta["optimizer_scalars"].items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {stem}: its optimizer state does not fit this run's optimizers "
            f"({type(error).__name__}: {error})"
        ) from None
    return meta


def publish_next(directory: Path) -> None:
    """The checkpoint just written whole as ``next`` becomes ``last``, and the ``last`` before it ``previous``: a
    crash at any point leaves a complete one to resume from (:func:`find_checkpoint`)."""
    if is_complete(directory / LAST):
        for suffix in (".safetensors", ".json"):
            os.replace(directory / f"{LAST}{suffix}", directory / f"{PREVIOUS}{suffix}")
    for suffix in (".safetensors", ".json"):
        os.replace(directory / f"{NEXT}{suffix}", directory / f"{LAST}{suffix}")


def check_resumable(stem: Path, config: TrainConfig, allow_changes: tuple[str, ...]) -> None:
    """CheckpointError naming every setting of ``config`` that differs from the checkpoint's (and may not)."""
    saved, now = read_config(stem), json.loads(json.dumps(asdict(config)))
    differ = settings_that_differ(saved, now, ignore=(*RESULT_NEUTRAL, *allow_changes))
    if differ:
        listed = "; ".join(f"{name}: checkpoint {saved.get(name)!r}, now {now.get(name)!r}" for name in differ)
        allowed = [name for name in differ if name in OVERRIDABLE]
        hint = f" (--override {allowed[0]}=VALUE allows a change of {', '.join(allowed)})" if allowed else ""
        raise CheckpointError(f"{stem}: this run's settings differ from its checkpoint's: {listed}{hint}")
