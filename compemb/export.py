"""The compact model file for inference: export a trained run, load it back, score raw Criteo rows.

A model file is one safetensors file. Its tensors are what inference reads: the model's state (the compressed
tables as trained, or quantized; CAFE's hot-id map and sketch, CCE's pointers, the MLPs), without the optimizer
and without state only training uses (each method names it in ``training_only_state``: AdaEmbed's per-id
importance scores, the sketches' decayed mass, CCE's clustering progress); and, for a categorified Criteo data set,
the vocabulary (``vocabulary.C1`` ...: each feature's kept raw values, int64). Its safetensors metadata holds one
JSON header under ``"compemb"``: the format and version, the run's config, the features' cardinalities and the
dense width, how raw values map to ids, the quantization spec of each quantized table, the names left out, and a
SHA-256 over the rest of the header and every tensor's name, dtype, shape and bytes, so a truncated or altered file
(its header included) is refused rather than served.

Loading trusts nothing before it is checked, and allocates nothing the file has not earned: it reads the
safetensors index (bounded), checks the header's fields, builds the model the header describes on the ``meta``
device (shapes only) and refuses a file whose tensors are not exactly that model's (less its training-only state)
or whose model would not fit in ``max_memory``; then it hashes the file in chunks, and only then builds the model,
wraps the quantized tables as their spec says and loads the state: the predictions equal the trained model's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from compemb.checks import machine_memory_bytes
from compemb.data.criteo import (
    MAX_LINE_BYTES,
    MISSING,
    NUM_DENSE,
    NUM_SPARSE,
    VOCABULARY,
    Categorifier,
    Rejections,
    open_binary,
    read_line,
    read_rows,
    transform_dense,
)
from compemb.data.dataset import open_dataset
from compemb.embeddings.base import CompressedEmbedding
from compemb.feature_methods import any_method
from compemb.io import atomic_binary_writer, atomic_write_bytes
from compemb.metrics import BinnedAUC
from compemb.outputs import check_output_file
from compemb.quantize import QuantizedEmbedding, quantize
from compemb.train import TrainConfig, build_model, checkpoint_config, id_counts, load_model_state, read_checkpoint

FORMAT, VERSION = "compemb-model", 2  # version 2: the checksum covers the header too
HEADER_KEY = "compemb"
MAX_CARDINALITY = 1 << 62  # ids are int64
MAX_DENSE = 1 << 20
MAX_INDEX_BYTES = 100_000_000  # safetensors' own bound on its JSON index
HASH_CHUNK_BYTES = 1 << 22
# safetensors' dtype names, to compare a file's index with the model its header describes
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ModelFileError(ValueError):
    """A model file that cannot be served: not one, damaged, altered, or of another version; the message says which."""


def _read_index(file: BinaryIO, size: int, where: object) -> tuple[dict[str, Any], int]:
    """A safetensors file's index (each tensor's ``dtype``, ``shape``, ``data_offsets``; ``__metadata__``) and
    where its data starts: the format is 8 bytes of little-endian length, then that many bytes of JSON."""
    file.seek(0)
    head = file.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 <= length <= min(MAX_INDEX_BYTES, size - 8):
        raise ModelFileError(f"{where} is damaged or not a compemb model file (no safetensors index fits its size)")
    try:
        index = json.loads(file.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{where} is damaged or not a compemb model file (its index is not JSON)") from None
    return index, 8 + length


def _digest(file: BinaryIO, index: dict[str, Any], data_start: int, header: dict[str, Any]) -> str:
    """SHA-256 over the header (less its ``sha256``, as sorted JSON), then every tensor's name, dtype, shape and
    bytes in name order, read from ``file`` in chunks (a file of any size hashes in bounded memory)."""
    digest = hashlib.sha256()
    described = {key: value for key, value in header.items() if key != "sha256"}
    digest.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(key for key in index if key != "__metadata__"):
        entry = index[name]
        begin, end = entry["data_offsets"]
        digest.update(f"\n{name}|{entry['dtype']}|{list(entry['shape'])}|".encode())
        file.seek(data_start + begin)
        left = end - begin
        while left > 0:
            chunk = file.read(min(HASH_CHUNK_BYTES, left))
            if not chunk:
                raise ModelFileError(f"a tensor of {name!r} runs past the end of the file: it is truncated")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _signed_payload(tensors: dict[str, Tensor], header: dict[str, Any]) -> bytes:
    """The model file's bytes: ``tensors`` and ``header`` with the SHA-256 of both (:func:`_digest`) added."""
    described = json.loads(json.dumps(header))  # as a reader will parse it back
    unsigned = save_tensors(tensors, metadata={HEADER_KEY: json.dumps(described)})
    stream = io.BytesIO(unsigned)
    index, data_start = _read_index(stream, len(unsigned), "the model being written")
    described["sha256"] = _digest(stream, index, data_start, described)
    del unsigned, stream
    return save_tensors(tensors, metadata={HEADER_KEY: json.dumps(described)})


def _training_only_keys(model: torch.nn.Module) -> list[str]:
    """The names in ``model``'s state of what only training uses (each method's ``training_only_state``)."""
    keys, found = set(model.state_dict()), []
    for prefix, module in model.named_modules():  # a quantized table's method is its ``inner``: found here too
        if isinstance(module, CompressedEmbedding):
            found += [
                key for name in module.training_only_state if (key := f"{prefix}.{name}" if prefix else name) in keys
            ]
    return sorted(found)


def _inference_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """The model's state without what only training uses; the names left out."""
    dropped = _training_only_keys(model)
    state = {
        name: value.detach().cpu().contiguous() for name, value in model.state_dict().items() if name not in dropped
    }
    return state, dropped


def _planning_counts(model: torch.nn.Module) -> dict[str, int] | None:
    """For a method sized by the training split's counts (``offline``): how many ids of each feature were counted.

    Its sizes depend only on how many ids have a count (and the budget), so counts of 1 for that many ids rebuild
    the same shapes, and the saved state then holds the real hot ids."""
    collection = model.embeddings  # type: ignore[union-attr]
    if not any_method(collection.method, "needs_frequencies"):
        return None
    if collection.sharing == "shared":
        counted = collection.embeddings["shared"].counted_ids[1]
        planned = {}
        for feature in collection.features:  # only the total counted matters: fill the features in order
            planned[feature.name] = min(counted, feature.num_embeddings)
            counted -= planned[feature.name]
        return planned
    return {name: getattr(table, "counted_ids", (0, 0))[1] for name, table in collection.embeddings.items()}


def _frequencies(cardinalities: list[int], planned: dict[str, int] | None) -> dict[str, Tensor] | None:
    if planned is None:
        return None
    return {f"C{i + 1}": (torch.arange(n) < planned[f"C{i + 1}"]).long() for i, n in enumerate(cardinalities)}


def _vocabulary(data: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """How raw values become ids (the header's ``"ids"``) and, for a categorified set, its vocabulary tensors."""
    options = manifest.get("options", {})
    if str(manifest.get("source", "")).startswith("criteo"):
        if options.get("hash_mod") is not None:
            return {"rule": "hash_mod", "hash_mod": int(options["hash_mod"])}, {}
        path = data / VOCABULARY
        if not path.is_file():
            raise ModelFileError(
                f"{data} has no {VOCABULARY} (made before compemb kept vocabularies): "
                f"preprocess it again to export a model that reads raw rows"
            )
        kept = load_tensors(path.read_bytes())
        return {"rule": "vocabulary"}, {f"vocabulary.{name}": values for name, values in kept.items()}
    # synthetic (or other) data has no raw values: the model is served on ids
    return {"rule": "ids", "source": manifest.get("source")}, {}


def export_run(
    run: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str | None = None,
    checkpoint: str = "best",
    trust_unverified: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the model of a training run (its ``best`` or ``last`` checkpoint) as one file; return what it holds.

    ``scheme`` (``"int8"``, ``"int4"``, ``"pq"``) quantizes the tables first (:func:`compemb.quantize`). The report
    gives the file's bytes beside ``memory()`` of the tables, the MLPs' bytes and the vocabulary's. The checkpoint
    is verified as ``eval`` and a resume verify it (:func:`compemb.train.read_checkpoint`: its SHA-256 and step;
    one without a SHA-256 only ``trust_unverified``): the file's checksum vouches for nothing it was not given.
    ``out`` replaces a compemb model file, and anything else only with ``overwrite``, never a run's or data set's
    file (:func:`compemb.outputs.check_output_file`).
    """
    run, out = Path(run), Path(out)
    stem = run / "checkpoints" / checkpoint
    check_output_file(out, "model", overwrite=overwrite)
    if not Path(f"{stem}.json").exists() or not Path(f"{stem}.safetensors").exists():
        raise FileNotFoundError(f"{run} is not a finished compemb run: no checkpoints/{checkpoint}.json/.safetensors")
    tensors, meta = read_checkpoint(stem, trust_unverified)  # verified before anything of it is used
    config = checkpoint_config(stem, meta)
    manifest, splits = open_dataset(config.data)
    if manifest.get("bags"):  # the file format and compemb predict (Criteo TSV) carry one id per feature
        raise ValueError(
            f"{run}: its data set has multi-hot features ({[b['name'] for b in manifest['bags']]}); "
            "export does not carry them yet"
        )
    num_dense = int(splits["train"].dense.shape[1])
    frequencies = None
    if any_method(config.method, "needs_frequencies"):  # sized by the training split's counts, as training built it
        counts = id_counts(splits["train"], manifest["cardinalities"])
        frequencies = {f"C{i + 1}": torch.from_numpy(c) for i, c in enumerate(counts)}
    model = build_model(config, manifest["cardinalities"], num_dense, frequencies)
    load_model_state(model, tensors, stem)
    model.eval()
    if scheme is not None:
        model = quantize(model, scheme)
    state, dropped = _inference_state(model)
    ids, vocabulary = _vocabulary(Path(config.data), manifest)
    everything = {**{f"model.{k}": v for k, v in state.items()}, **vocabulary}
    specs = {name: module.spec() for name, module in model.named_modules() if isinstance(module, QuantizedEmbedding)}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": meta["config"],
        "step": meta.get("step"),
        "cardinalities": manifest["cardinalities"],
        "num_dense": num_dense,
        "ids": ids,
        "quantized": specs,
        "dropped": dropped,
        "planning_counts": _planning_counts(model),
    }
    payload = _signed_payload(everything, header)
    atomic_write_bytes(out, payload)
    embeddings = model.embeddings.memory().total  # type: ignore[union-attr]
    mlp = sum(v.numel() * v.element_size() for k, v in state.items() if not k.startswith("embeddings."))
    return {
        "file_bytes": len(payload),
        "embedding_memory_bytes": embeddings,
        "mlp_bytes": mlp,
        "vocabulary_bytes": sum(v.numel() * v.element_size() for v in vocabulary.values()),
        "stored_embedding_bytes": sum(
            v.numel() * v.element_size() for k, v in state.items() if k.startswith("embeddings.")
        ),
        "dropped": dropped,
        "scheme": scheme,
        "reads": _what_it_reads(ids, num_dense, manifest["cardinalities"]),
    }


def _what_it_reads(ids: dict[str, Any], num_dense: int, cardinalities: list[int]) -> str:
    """What an exported model scores: raw Criteo rows (``compemb predict``) or preprocessed ids (``load_model``)."""
    if ids["rule"] != "ids" and num_dense == NUM_DENSE and len(cardinalities) == NUM_SPARSE:
        return "raw Criteo TSV rows (compemb predict) and preprocessed ids (load_model)"
    source = ids.get("source") or "this data set"
    return (
        f"preprocessed ids (load_model); compemb predict reads raw Criteo TSV rows only, and {source}'s raw "
        f"values are not kept to map them"
    )


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

    def refuse(what: str) -> None:
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
    dropped = _training_only_keys(meta)
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
    _check_fields(path, header)
    try:
        config = TrainConfig(**header["config"])
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: its header's config is not one compemb trains ({error})") from None
    expected, dropped = _expected_entries(path, header, config, max_memory)
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
    with open(path, "rb") as file:
        index, data_start = _read_index(file, path.stat().st_size, path)
        if _digest(file, index, data_start, header) != header["sha256"]:
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


def has_label_column(input_path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> bool:
    """Whether a raw Criteo TSV's first line has a label column (1 + 13 + 26 = 40 fields; test.txt has 39).

    It reads at most ``max_line_bytes`` of each line: an input without newlines (``/dev/zero``) is refused."""
    with open_binary(Path(input_path)) as stream:
        number = 1
        while raw := read_line(stream, max_line_bytes, f"{input_path}:{number}"):
            number += 1
            line = raw.rstrip(b"\r\n")
            if line:
                fields = line.count(b"\t") + 1
                if fields == 1 + NUM_DENSE + NUM_SPARSE:
                    return True
                if fields == NUM_DENSE + NUM_SPARSE:
                    return False
                raise ModelFileError(
                    f"{input_path}: its first line has {fields} tab-separated fields; Criteo rows "
                    f"have 40 (label first) or 39 (no label)"
                )
    raise ModelFileError(f"{input_path} has no lines to score")


def predict_file(
    model_path: str | os.PathLike,
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    labeled: bool | None = None,
    max_memory: int | None = None,
    block_bytes: int = 1 << 25,
    max_line_bytes: int = MAX_LINE_BYTES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score every line of a raw Criteo TSV: one click probability per line in ``out`` (``nan`` for a rejected line,
    so line i of ``out`` is line i of the input; ``"-"``: standard output); return the counts of rows scored and rejected, by reason.

    ``labeled`` None: told by the first line's field count (:func:`has_label_column`). With labels the result
    also holds the scored rows' ``log_loss`` and ``auc`` (``labeled`` says which it was; AUC from
    :class:`compemb.metrics.BinnedAUC`). The input is streamed in blocks of ``block_bytes`` and scores are written
    as they come (``out`` appears whole when done), so memory stays bounded however long the input is; a line over
    ``max_line_bytes`` is refused. ``max_memory``: see :func:`load_model`. An ``out`` that exists is replaced only
    with ``overwrite`` (:func:`compemb.outputs.check_output_file`; never the input or the model)."""
    if str(input_path) == "-":
        raise ValueError(
            "predict reads a file (it looks at the first line before scoring): '-' (standard input) is "
            "not read; give the TSV's path (plain or gzip)"
        )
    if str(out) != "-":
        check_output_file(out, "scores", overwrite=overwrite, inputs=[("--input", input_path), ("--model", model_path)])
    if Path(input_path).is_fifo():  # the label probe would eat the stream's first bytes
        raise ValueError(
            f"--input {input_path} is a FIFO: predict reads its first line twice (to tell a label "
            f"column); give a file's path"
        )
    served = load_model(model_path, max_memory=max_memory)
    if (
        served.header["ids"]["rule"] == "ids"
        or served.header["num_dense"] != NUM_DENSE
        or len(served.header["cardinalities"]) != NUM_SPARSE
    ):
        source = served.header["ids"].get("source") or "non-Criteo"
        raise ModelFileError(
            f"{model_path} was trained on {source} data: compemb predict reads raw Criteo TSV rows; "
            f"score preprocessed ids with compemb.export.load_model"
        )
    detected = has_label_column(input_path, max_line_bytes)
    if labeled and not detected:  # every line would be rejected as one field short
        raise ValueError(
            f"{input_path}: scored as labelled (--labeled), but its first line has no label column "
            f"({NUM_DENSE + NUM_SPARSE} fields, not {1 + NUM_DENSE + NUM_SPARSE}): leave --labeled out"
        )
    labeled = detected if labeled is None else labeled
    rejections, rows_read, scored = Rejections(), 0, 0
    ranking, log_loss_sum = BinnedAUC(), 0.0
    # "-": the scores go to standard output as they come; any other path appears whole when done
    writer = contextlib.nullcontext(sys.stdout.buffer) if str(out) == "-" else atomic_binary_writer(out)
    with writer as written:
        for block in read_rows(
            input_path, labeled, rejections, strict=False, block_bytes=block_bytes, max_line_bytes=max_line_bytes
        ):
            scores = np.full(len(block.status), np.nan)
            if len(block.labels):
                dense, ids = served.encode(block.dense, block.sparse)
                with torch.inference_mode():  # scoring only: no autograd graph
                    good = torch.sigmoid(served(dense, ids)).double().numpy()
                scores[block.status == 0] = good
                scored += len(block.labels)
                if labeled:
                    truth, p = block.labels.astype(np.float64), np.clip(good, 1e-15, 1 - 1e-15)
                    log_loss_sum -= float(np.sum(truth * np.log(p) + (1 - truth) * np.log1p(-p)))
                    ranking.update(good, block.labels)
            rows_read += len(scores)
            written.write("".join("nan\n" if np.isnan(score) else f"{score:.9f}\n" for score in scores).encode())
    result: dict[str, Any] = {
        "rows_read": rows_read,
        "rows_scored": scored,
        "rejected": rejections.total,
        "rejected_by_reason": dict(rejections.counts),
        "labeled": labeled,
    }
    if labeled and scored:
        result["log_loss"] = log_loss_sum / scored
        result["auc"] = ranking.value() if ranking.has_both_classes else float("nan")
    return result
