"""Loading a model file: every header field and tensor checked against the model the header describes, on the
``meta`` device and within a memory bound, before anything is allocated; then the checksum, then the model, served
as :class:`ServedModel`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from compemb.checks import machine_memory_bytes
from compemb.data.criteo.rows import MISSING
from compemb.data.criteo.transforms import Categorifier, transform_dense
from compemb.export.model_file import (
    FORMAT,
    HEADER_KEY,
    MAX_CARDINALITY,
    MAX_DENSE,
    SAFETENSORS_DTYPES,
    VERSION,
    ModelFileError,
    checksum,
    read_index,
    training_only_keys,
)
from compemb.feature_methods import any_method
from compemb.quantize import QuantizedEmbedding
from compemb.train import TrainConfig, build_model


class ServedModel(torch.nn.Module):
    """An exported model, for inference: ``forward(dense, ids)`` gives logits (in eval mode, with no autograd graph:
    its parameters do not require gradients); :meth:`encode` maps raw Criteo values."""

    def __init__(self, model: torch.nn.Module, header: dict[str, Any], vocabulary: Categorifier | None) -> None:
        super().__init__()
        self.model, self.header, self.vocabulary = model, header, vocabulary
        self.requires_grad_(False)
        self.eval()

    def forward(self, dense: Tensor, ids: Tensor) -> Tensor:
        """Logits of rows: transformed dense features ``(B, num_dense)`` and ids ``(B, num_features)``."""
        with torch.no_grad():  # the lookups' own hooks (adaptive methods) must not record either
            return self.model(dense, ids)

    def encode(self, dense_raw: np.ndarray, sparse_raw: np.ndarray) -> tuple[Tensor, Tensor]:
        """Raw Criteo values (as the parser gives them) -> the model's inputs, as preprocessing mapped them."""
        rule = self.header["ids"]["rule"]
        if rule == "ids":
            raise ModelFileError(
                f"this model was trained on {self.header['ids'].get('source')!r} data, which has no "
                f"raw values: give it ids"
            )
        if rule == "hash_mod":
            mod = self.header["ids"]["hash_mod"]
            ids = np.where(sparse_raw == MISSING, mod, sparse_raw % mod)
        else:
            ids = self.vocabulary(sparse_raw)  # type: ignore[misc]
        return torch.from_numpy(transform_dense(dense_raw)), torch.from_numpy(ids.astype(np.int64))


def _check_fields(path: Path, header: dict[str, Any]) -> None:
    """ModelFileError naming the first of the header's fields that is not what an exported model holds."""

    def refuse(what: str) -> NoReturn:
        raise ModelFileError(f"{path}: its header's {what}; the file is damaged or was not written by compemb export")

    cardinalities = header.get("cardinalities")
    if (
        not isinstance(cardinalities, list)
        or not cardinalities
        or not all(type(n) is int and 1 <= n <= MAX_CARDINALITY for n in cardinalities)
    ):
        refuse(f"cardinalities are not a list of integers in [1, {MAX_CARDINALITY}]")
    if type(header.get("num_dense")) is not int or not 0 <= header["num_dense"] <= MAX_DENSE:
        refuse(f"num_dense is not an integer in [0, {MAX_DENSE}]")
    if (
        not isinstance(header.get("config"), dict)
        or not isinstance(header.get("quantized"), dict)
        or not all(isinstance(spec, dict) for spec in header["quantized"].values())
    ):
        refuse("config or quantized is not an object")
    if not isinstance(header.get("dropped"), list) or not all(isinstance(name, str) for name in header["dropped"]):
        refuse("dropped is not a list of names")
    if not isinstance(header.get("sha256"), str):
        refuse("sha256 is missing")
    ids = header.get("ids")
    if not isinstance(ids, dict) or ids.get("rule") not in ("ids", "hash_mod", "vocabulary"):
        refuse("ids rule is not one of ids, hash_mod, vocabulary")
    if ids["rule"] == "hash_mod" and (
        type(ids.get("hash_mod")) is not int or ids["hash_mod"] < 1 or min(cardinalities) < ids["hash_mod"] + 1
    ):
        refuse("hash_mod is not an integer >= 1 below every cardinality")
    planned = header.get("planning_counts")
    if planned is not None and (
        not isinstance(planned, dict)
        or any(
            type(planned.get(f"C{i + 1}")) is not int or not 0 <= planned[f"C{i + 1}"] <= n
            for i, n in enumerate(cardinalities)
        )
    ):
        refuse("planning_counts are not a count of ids of every feature")


def _build(header: dict[str, Any], config: TrainConfig, device: str | None = None) -> torch.nn.Module:
    """The model the header describes, its quantized tables wrapped as their specs say (``device="meta"``: shapes
    only, nothing allocated)."""
    model = build_model(
        config,
        header["cardinalities"],
        header["num_dense"],
        _frequencies(header["cardinalities"], header.get("planning_counts")),
        device=device,
    )
    for name, spec in header["quantized"].items():  # wrap the tables as they were quantized
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[child] = QuantizedEmbedding.from_spec(parent._modules[child], spec)  # type: ignore[arg-type]
    return model


def _frequencies(cardinalities: list[int], planned: dict[str, int] | None) -> dict[str, Tensor] | None:
    if planned is None:
        return None
    return {f"C{i + 1}": (torch.arange(n) < planned[f"C{i + 1}"]).long() for i, n in enumerate(cardinalities)}


def _tensor_bytes(entries: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """Bytes of tensors given as (safetensors dtype name, shape)."""
    itemsize = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}
    return sum(itemsize.get(dtype, 8) * math.prod(shape) for dtype, shape in entries.values())


def _expected_entries(
    path: Path, header: dict[str, Any], config: TrainConfig, max_memory: int | None
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[str]]:
    """What the file must hold (name -> (dtype, shape)) for the model its header describes, the names of its
    training-only state; refuses (ModelFileError) a model that does not fit
    ``max_memory`` (default: this machine's memory). Built on the meta device: nothing is allocated but the counts
    an ``offline`` table is planned from (bounded first)."""
    limit = max_memory if max_memory is not None else machine_memory_bytes()
    where = "--max-memory" if max_memory is not None else "this machine's memory"
    planning = 17 * sum(header["cardinalities"]) if any_method(config.method, "needs_frequencies") else 0
    if limit is not None and planning > limit:
        raise ModelFileError(
            f"{path}: its model is planned from counts of {sum(header['cardinalities']):,} ids "
            f"({planning / 1e9:,.2f} GB), more than {where} ({limit / 1e9:,.2f} GB)"
        )
    try:
        meta = _build(header, config, device="meta")
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as error:
        raise ModelFileError(f"{path}: its header describes no model this compemb can build ({error})") from None
    dropped = training_only_keys(meta)
    expected = {
        f"model.{name}": (SAFETENSORS_DTYPES.get(value.dtype, str(value.dtype)), tuple(value.shape))
        for name, value in meta.state_dict().items()
        if name not in dropped
    }
    if header["ids"]["rule"] == "vocabulary":  # each feature's kept values: its ids less the two reserved ones
        expected.update({f"vocabulary.C{i + 1}": ("I64", (n - 2,)) for i, n in enumerate(header["cardinalities"])})
    unique = {id(t): t for t in [*meta.parameters(), *meta.buffers()]}.values()
    allocated = sum(t.numel() * t.element_size() for t in unique) + planning
    needed = allocated + _tensor_bytes(expected)  # the model, and the file's tensors read to be copied into it
    if limit is not None and needed > limit:
        raise ModelFileError(
            f"{path}: its model needs {needed / 1e9:,.2f} GB to load (the model "
            f"{allocated / 1e9:,.2f} GB, its tensors read from the file beside it), more than "
            f"{where} ({limit / 1e9:,.2f} GB)"
        )
    return expected, dropped


def load_model(path: str | os.PathLike, max_memory: int | None = None) -> ServedModel:
    """Load a model file written by :func:`export_run`; refuses (ModelFileError) a damaged, altered or forged one,
    and one whose model needs more than ``max_memory`` bytes (default: this machine's memory), before allocating."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    entries, header = _read_header(path)
    _check_fields(path, header)
    try:
        config = TrainConfig(**header["config"])
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: its header's config is not one compemb trains ({error})") from None
    expected, dropped = _expected_entries(path, header, config, max_memory)
    _check_entries(path, header, entries, expected, dropped)
    with open(path, "rb") as file:
        index, data_start = read_index(file, path.stat().st_size, path)
        if checksum(file, index, data_start, header) != header["sha256"]:
            raise ModelFileError(
                f"{path} was altered after it was written: its header and tensors do not match its checksum"
            )
    model = _build(header, config)
    with safe_open(str(path), framework="pt") as opened:
        tensors = {name: opened.get_tensor(name) for name in opened.keys()}
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=False)  # exactly the model's state less ``dropped``: checked above
    vocabulary = None
    if header["ids"]["rule"] == "vocabulary":
        vocabulary = Categorifier.from_kept(
            [tensors[f"vocabulary.C{i + 1}"].numpy() for i in range(len(header["cardinalities"]))]
        )
    return ServedModel(model, header, vocabulary)


def _read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, Any]]:
    """The file's tensors as its index lists them (name -> (dtype, shape)) and its compemb header, of this
    format and version; reads no tensor data."""
    try:
        with safe_open(str(path), framework="pt") as opened:  # maps the file and checks its index; reads no data
            metadata = opened.metadata() or {}
            entries = {
                name: (opened.get_slice(name).get_dtype(), tuple(opened.get_slice(name).get_shape()))
                for name in opened.keys()
            }
    except (SafetensorError, ValueError, OSError) as error:
        raise ModelFileError(f"{path} is damaged or not a compemb model file ({error})") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, ValueError, RecursionError):  # (json's errors are ValueErrors; nesting past the stack too)
        raise ModelFileError(
            f"{path} is a safetensors file but not a compemb model: no {HEADER_KEY!r} header"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        found = (header.get("format"), header.get("version")) if isinstance(header, dict) else (None, None)
        again = " (version 1's checksum left the header out: export the run again)" if found == (FORMAT, 1) else ""
        raise ModelFileError(
            f"{path}: format {found[0]!r} version {found[1]!r}; this compemb reads {FORMAT!r} version {VERSION}{again}"
        )
    return entries, header


def _check_entries(
    path: Path,
    header: dict[str, Any],
    entries: dict[str, tuple[str, tuple[int, ...]]],
    expected: dict[str, tuple[str, tuple[int, ...]]],
    dropped: list[str],
) -> None:
    """ModelFileError unless the file holds exactly the tensors of the model its header describes, and its
    ``dropped`` names exactly that model's training-only state."""
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    differing = sorted(name for name in set(expected) & set(entries) if expected[name] != entries[name])
    if missing or unexpected or differing or sorted(header["dropped"]) != dropped:
        raise ModelFileError(
            f"{path} does not hold the model its header describes: "
            + "; ".join(
                part
                for part in (
                    f"missing {missing[:3]}" if missing else "",
                    f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"{differing[0]} is {entries[differing[0]]}, the model's is {expected[differing[0]]}"
                    if differing
                    else "",
                    f"'dropped' lists {sorted(set(header['dropped']) ^ set(dropped))[:3]}, which the model "
                    f"{'needs' if set(header['dropped']) - set(dropped) else 'drops'}"
                    if sorted(header["dropped"]) != dropped
                    else "",
                )
                if part
            )
        )
