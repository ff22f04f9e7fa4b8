"""Exporting a training run: its model (less what only training uses, optionally quantized), how raw values map
to its ids, and the header describing both, written as one signed model file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load as load_tensors
from torch import Tensor

from compemb.data.criteo.rows import NUM_DENSE, NUM_SPARSE
from compemb.data.criteo.transforms import VOCABULARY
from compemb.data.dataset.reader import open_dataset
from compemb.export.model_file import FORMAT, VERSION, ModelFileError, signed_payload, training_only_keys
from compemb.feature_methods import any_method
from compemb.io import atomic_write_bytes
from compemb.outputs import check_output_file
from compemb.quantize import QuantizedEmbedding, quantize
from compemb.train import build_model, checkpoint_config, id_counts, load_model_state, read_checkpoint

if TYPE_CHECKING:
    from compemb.collection import EmbeddingCollection


def _collection(model: torch.nn.Module) -> EmbeddingCollection:
    """The model's tables (the DLRM and DCN that build_model makes hold them as ``embeddings``)."""
    return cast("EmbeddingCollection", model.embeddings)


def _inference_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """The model's state without what only training uses; the names left out."""
    dropped = training_only_keys(model)
    state = {
        name: value.detach().cpu().contiguous() for name, value in model.state_dict().items() if name not in dropped
    }
    return state, dropped


def _planning_counts(model: torch.nn.Module) -> dict[str, int] | None:
    """For a method sized by the training split's counts (``offline``): how many ids of each feature were counted.

    Its sizes depend only on how many ids have a count (and the budget), so counts of 1 for that many ids rebuild
    the same shapes, and the saved state then holds the real hot ids."""
    collection = _collection(model)
    if not any_method(collection.method, "needs_frequencies"):
        return None
    if collection.sharing == "shared":
        counted = cast("tuple[int, int]", collection.embeddings["shared"].counted_ids)[1]  # offline's (counted, wanted)
        planned = {}
        for feature in collection.features:  # only the total counted matters: fill the features in order
            planned[feature.name] = min(counted, feature.num_embeddings)
            counted -= planned[feature.name]
        return planned
    return {name: getattr(table, "counted_ids", (0, 0))[1] for name, table in collection.embeddings.items()}


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
    payload = signed_payload(everything, header)
    atomic_write_bytes(out, payload)
    embeddings = _collection(model).memory().total
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
