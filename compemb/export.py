"""The compact model file for inference: export a trained run, load it back, score raw Criteo rows.

A model file is one safetensors file. Its tensors are what inference reads: the model's state (the compressed
tables as trained, or quantized; CAFE's hot-id map and sketch, CCE's pointers, the MLPs), without the optimizer
and without state only training uses (each method names it in ``training_only_state``: AdaEmbed's per-id
importance scores, the sketches' decayed mass, CCE's clustering progress); and, for a categorified Criteo data set,
the vocabulary (``vocabulary.C1`` ...: each feature's kept raw values, int64). Its safetensors metadata holds one
JSON header under ``"compemb"``: the format and version, the run's config, the features' cardinalities and the
dense width, how raw values map to ids, the quantization spec of each quantized table, the names left out, and a
SHA-256 of every tensor's bytes, so a truncated or altered file is refused rather than served.

Loading rebuilds the model from the config (as training built it, without the data), wraps the quantized tables
as their spec says, and loads the state: the predictions equal the trained model's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from compemb.data.criteo import MISSING, NUM_DENSE, NUM_SPARSE, VOCABULARY, Categorifier, Rejections, read_rows
from compemb.data.criteo import _open_binary, transform_dense
from compemb.data.dataset import open_dataset
from compemb.embeddings.base import CompressedEmbedding
from compemb.io import atomic_write_bytes, atomic_write_text
from compemb.metrics import auc
from compemb.quantize import QuantizedEmbedding, quantize
from compemb.registry import get_method
from compemb.train import TrainConfig, build_model, id_counts

FORMAT, VERSION = "compemb-model", 1
HEADER_KEY = "compemb"


class ModelFileError(ValueError):
    """A model file that cannot be served: not one, damaged, altered, or of another version; the message says which."""


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _inference_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """The model's state without what only training uses (each method's ``training_only_state``); the names left out."""
    state = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    dropped = []
    for prefix, module in model.named_modules():  # a quantized table's method is its ``inner``: found here too
        if isinstance(module, CompressedEmbedding):
            for name in module.training_only_state:
                key = f"{prefix}.{name}" if prefix else name
                if state.pop(key, None) is not None:
                    dropped.append(key)
    return state, sorted(dropped)


def _planning_counts(model: torch.nn.Module) -> dict[str, int] | None:
    """For a method sized by the training split's counts (``offline``): how many ids of each feature were counted.

    Its sizes depend only on how many ids have a count (and the budget), so counts of 1 for that many ids rebuild
    the same shapes, and the saved state then holds the real hot ids."""
    collection = model.embeddings  # type: ignore[union-attr]
    if not get_method(collection.method).needs_frequencies:
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
            raise ModelFileError(f"{data} has no {VOCABULARY} (made before compemb kept vocabularies): "
                                 f"preprocess it again to export a model that reads raw rows")
        kept = load_tensors(path.read_bytes())
        return {"rule": "vocabulary"}, {f"vocabulary.{name}": values for name, values in kept.items()}
    # synthetic (or other) data has no raw values: the model is served on ids
    return {"rule": "ids", "source": manifest.get("source")}, {}


def export_run(run: str | os.PathLike, out: str | os.PathLike, scheme: str | None = None,
               checkpoint: str = "best") -> dict[str, Any]:
    """Write the model of a training run (its ``best`` or ``last`` checkpoint) as one file; return what it holds.

    ``scheme`` (``"int8"``, ``"int4"``, ``"pq"``) quantizes the tables first (:func:`compemb.quantize`). The report
    gives the file's bytes beside ``memory()`` of the tables, the MLPs' bytes and the vocabulary's.
    """
    run, out = Path(run), Path(out)
    stem = run / "checkpoints" / checkpoint
    if not Path(f"{stem}.json").is_file() or not Path(f"{stem}.safetensors").is_file():
        raise FileNotFoundError(f"{run} is not a finished compemb run: no checkpoints/{checkpoint}.json/.safetensors")
    meta = json.loads(Path(f"{stem}.json").read_text())
    config = TrainConfig(**meta["config"])
    manifest, splits = open_dataset(config.data)
    if manifest.get("bags"):  # the file format and compemb predict (Criteo TSV) carry one id per feature
        raise ValueError(f"{run}: its data set has multi-hot features ({[b['name'] for b in manifest['bags']]}); "
                         "export does not carry them yet")
    num_dense = int(splits["train"].dense.shape[1])
    frequencies = None
    if get_method(config.method).needs_frequencies:  # sized by the training split's counts, as training built it
        counts = id_counts(splits["train"], manifest["cardinalities"])
        frequencies = {f"C{i + 1}": torch.from_numpy(c) for i, c in enumerate(counts)}
    model = build_model(config, manifest["cardinalities"], num_dense, frequencies)
    tensors = load_tensors(Path(f"{stem}.safetensors").read_bytes())
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    model.eval()
    if scheme is not None:
        model = quantize(model, scheme)
    state, dropped = _inference_state(model)
    ids, vocabulary = _vocabulary(Path(config.data), manifest)
    everything = {**{f"model.{k}": v for k, v in state.items()}, **vocabulary}
    specs = {name: module.spec() for name, module in model.named_modules() if isinstance(module, QuantizedEmbedding)}
    header = {
        "format": FORMAT, "version": VERSION, "config": meta["config"], "step": meta.get("step"),
        "cardinalities": manifest["cardinalities"], "num_dense": num_dense, "ids": ids, "quantized": specs,
        "dropped": dropped, "planning_counts": _planning_counts(model), "sha256": _digest(everything),
    }
    payload = save_tensors(everything, metadata={HEADER_KEY: json.dumps(header)})
    atomic_write_bytes(out, payload)
    embeddings = model.embeddings.memory().total  # type: ignore[union-attr]
    mlp = sum(v.numel() * v.element_size() for k, v in state.items() if not k.startswith("embeddings."))
    return {"file_bytes": len(payload), "embedding_memory_bytes": embeddings, "mlp_bytes": mlp,
            "vocabulary_bytes": sum(v.numel() * v.element_size() for v in vocabulary.values()),
            "stored_embedding_bytes": sum(v.numel() * v.element_size() for k, v in state.items()
                                          if k.startswith("embeddings.")),
            "dropped": dropped, "scheme": scheme}


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
            raise ModelFileError(f"this model was trained on {self.header['ids'].get('source')!r} data, which has no "
                                 f"raw values: give it ids")
        if rule == "hash_mod":
            mod = self.header["ids"]["hash_mod"]
            ids = np.where(sparse_raw == MISSING, mod, sparse_raw % mod)
        else:
            ids = self.vocabulary(sparse_raw)  # type: ignore[misc]
        return torch.from_numpy(transform_dense(dense_raw)), torch.from_numpy(ids.astype(np.int64))


def load_model(path: str | os.PathLike) -> ServedModel:
    """Load a model file written by :func:`export_run`; refuses (ModelFileError) a damaged or altered one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    data = path.read_bytes()
    try:
        tensors = load_tensors(data)
        with safe_open(str(path), framework="pt") as opened:
            metadata = opened.metadata() or {}
    except (SafetensorError, ValueError, OSError) as error:
        raise ModelFileError(f"{path} is damaged or not a compemb model file ({error})") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ModelFileError(f"{path} is a safetensors file but not a compemb model: no {HEADER_KEY!r} header") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ModelFileError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}; this "
                             f"compemb reads {FORMAT!r} version {VERSION}")
    if _digest(tensors) != header.get("sha256"):
        raise ModelFileError(f"{path} was altered after it was written: its tensors do not match its checksum")
    config = TrainConfig(**header["config"])
    model = build_model(config, header["cardinalities"], header["num_dense"],
                        _frequencies(header["cardinalities"], header.get("planning_counts")))
    for name, spec in header["quantized"].items():  # wrap the tables as they were quantized
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[child] = QuantizedEmbedding.from_spec(parent._modules[child], spec)  # type: ignore[arg-type]
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(header["dropped"]):
        raise ModelFileError(f"{path} does not fit the model its header describes (missing "
                             f"{sorted(set(missing) - set(header['dropped']))[:3]}, unexpected {unexpected[:3]})")
    vocabulary = None
    if header["ids"]["rule"] == "vocabulary":
        vocabulary = Categorifier.from_kept([tensors[f"vocabulary.C{i + 1}"].numpy()
                                             for i in range(len(header["cardinalities"]))])
    return ServedModel(model, header, vocabulary)


@torch.no_grad()
def has_label_column(input_path: str | os.PathLike) -> bool:
    """Whether a raw Criteo TSV's first line has a label column (1 + 13 + 26 = 40 fields; test.txt has 39)."""
    with _open_binary(Path(input_path)) as stream:
        for raw in stream:
            line = raw.rstrip(b"\r\n")
            if line:
                fields = line.count(b"\t") + 1
                if fields == 1 + NUM_DENSE + NUM_SPARSE:
                    return True
                if fields == NUM_DENSE + NUM_SPARSE:
                    return False
                raise ModelFileError(f"{input_path}: its first line has {fields} tab-separated fields; Criteo rows "
                                     f"have 40 (label first) or 39 (no label)")
    raise ModelFileError(f"{input_path} has no lines to score")


def predict_file(model_path: str | os.PathLike, input_path: str | os.PathLike, out: str | os.PathLike,
                 labeled: bool | None = None) -> dict[str, Any]:
    """Score every line of a raw Criteo TSV: one click probability per line in ``out`` (``nan`` for a rejected line,
    so line i of ``out`` is line i of the input); return the counts of rows scored and rejected, by reason.

    ``labeled`` None: told by the first line's field count (:func:`has_label_column`). With labels the result
    also holds the scored rows' ``log_loss`` and ``auc`` (``labeled`` says which it was)."""
    served = load_model(model_path)
    if served.header["num_dense"] != NUM_DENSE or len(served.header["cardinalities"]) != NUM_SPARSE:
        raise ModelFileError(f"{model_path} was not trained on Criteo-shaped data: it cannot read a Criteo TSV")
    if labeled is None:
        labeled = has_label_column(input_path)
    rejections, lines, scored = Rejections(), [], 0
    labels, probabilities = [], []
    for block in read_rows(input_path, labeled, rejections, strict=False):
        scores = np.full(len(block.status), np.nan)
        if len(block.labels):
            dense, ids = served.encode(block.dense, block.sparse)
            with torch.inference_mode():  # scoring only: no autograd graph
                good = torch.sigmoid(served(dense, ids)).double().numpy()
            scores[block.status == 0] = good
            scored += len(block.labels)
            if labeled:
                labels.append(block.labels.astype(np.float64))
                probabilities.append(good)
        lines.extend("nan" if np.isnan(score) else f"{score:.9f}" for score in scores)
    atomic_write_text(out, "\n".join(lines) + "\n")
    result: dict[str, Any] = {"rows_read": len(lines), "rows_scored": scored, "rejected": rejections.total,
                              "rejected_by_reason": dict(rejections.counts), "labeled": labeled}
    if labeled and scored:
        truth, p = np.concatenate(labels), np.clip(np.concatenate(probabilities), 1e-15, 1 - 1e-15)
        result["log_loss"] = float(-np.mean(truth * np.log(p) + (1 - truth) * np.log1p(-p)))
        result["auc"] = auc(p, truth) if 0 < truth.sum() < len(truth) else float("nan")
    return result
