"""What a config builds: the model, its optimizers and learning rates, the frequency counts offline methods need, and
the refusals before any training (memory, untrainable data)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compemb import distributed
from compemb.checks import machine_memory_bytes
from compemb.collection import EmbeddingCollection, Feature
from compemb.data.dataset import DatasetError, Split, open_dataset
from compemb.data.validate import validate_dataset
from compemb.embeddings.adaptive import track_row_steps
from compemb.embeddings.base import CompressedEmbedding
from compemb.feature_methods import any_method, is_per_feature
from compemb.models import DLRM, DCNv2
from compemb.optim import CombinedOptimizer, RowAdagrad, RowAdam, RowwiseAdagrad
from compemb.registry import get_method, method_options
from compemb.train.config import SCHEDULE_OPTIONS, TrainConfig


def open_training_data(config: TrainConfig) -> tuple[dict[str, Any], dict[str, Split]]:
    """The data set's manifest and splits, with the splits training and evaluation need, every value checked (once
    per data set: the pass is remembered) and a run that could end (:func:`check_trainable`)."""
    manifest, splits = open_dataset(config.data)
    for split in ("train", config.eval_split):
        if split not in splits:
            raise DatasetError(
                f"{config.data} has no split {split!r} to train or evaluate on (it has {', '.join(splits)})"
            )
    validate_dataset(config.data, manifest, splits)
    check_trainable(config, splits)
    return manifest, splits


def check_trainable(config: TrainConfig, splits: dict[str, Split]) -> None:
    """DatasetError, before any training, where a run could not end: a train split without rows, or an
    evaluation split without rows, without labels or with one class (its AUC is undefined: the run would train to
    its first evaluation and fail there, its checkpoint unwritten)."""
    if len(splits["train"]) == 0:
        raise DatasetError(f"{config.data}: split 'train' has no rows to train on")
    data = splits[config.eval_split]
    if len(data) == 0:
        raise DatasetError(f"{config.data}: split {config.eval_split!r} has no rows to evaluate on")
    if data.labels is None:
        raise DatasetError(f"{config.data}: split {config.eval_split!r} has no labels to evaluate against")
    positives = int(np.count_nonzero(data.labels))
    if positives in (0, len(data)):
        only = "positives" if positives else "negatives"
        raise DatasetError(
            f"{config.data}: split {config.eval_split!r} holds only {only} ({len(data):,} rows): its "
            f"AUC is undefined; evaluate on a split with both classes (eval_split in a --config file)"
        )


def build_model(
    config: TrainConfig,
    cardinalities: list[int],
    num_dense: int,
    frequencies: dict[str, Tensor] | None = None,
    sparse: bool | None = None,
    bags: list[dict[str, Any]] | None = None,
    device: str | None = None,
) -> DLRM | DCNv2:
    """The model a config describes (DLRM or DCN over an EmbeddingCollection of ``C1..Cn``), freshly seeded.

    ``frequencies`` (per-feature id counts) are needed by methods built from them (``needs_frequencies``); an
    exported model rebuilds without them (its state then loads over whatever they chose). ``sparse``: whether the
    tables' gradients are sparse (default: for every optimizer but ``adam_dense``). ``bags``: the data set's
    multi-hot features (its manifest's ``"bags"``), after the one-hot ones. ``device="meta"`` builds the shapes
    alone (nothing allocated): what a model file's header would make is measured before it is made.
    """
    torch.manual_seed(config.seed)
    features = [Feature(f"C{i + 1}", n) for i, n in enumerate(cardinalities)]
    features += [Feature(bag["name"], int(bag["cardinality"]), bag["pooling"]) for bag in bags or ()]
    # sparse table gradients wherever the optimizer takes them (all but adam_dense), as the papers train
    table_optimizer = config.table_optimizer or config.optimizer
    options = {
        "sparse": table_optimizer != "adam_dense" if sparse is None else sparse,
        "init": config.init,
        **table_options_for(config.method, config.method_options),
    }
    if any_method(config.method, "needs_frequencies") and frequencies is None:
        frequencies = {f.name: torch.zeros(f.num_embeddings, dtype=torch.int64) for f in features}
    embeddings = EmbeddingCollection(
        features,
        config.embedding_dim,
        config.method,
        compression=config.compression,
        num_params=config.num_params,
        seed=config.seed,
        frequencies=frequencies,
        sharing=config.sharing,
        device=device,
        **options,
    )
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if config.model == "dlrm":
            return DLRM(embeddings, num_dense, config.bottom, config.top)
        return DCNv2(embeddings, num_dense, deep=config.top)


def id_counts(
    split: Split, cardinalities: list[int], chunk_rows: int = 1 << 20, rows: tuple[int, int] | None = None
) -> list[np.ndarray]:
    """How often each id occurs in each sparse column of ``split`` (or of its rows ``[low, high)``): one int64
    array per feature.

    Reads the memory-mapped ids ``chunk_rows`` rows at a time, so a split of any size needs one chunk of memory.
    """
    low, high = rows if rows is not None else (0, len(split))
    counts = [np.zeros(n, dtype=np.int64) for n in cardinalities]
    for start in range(low, high, chunk_rows):
        chunk = np.asarray(split.sparse[start : min(start + chunk_rows, high)])
        for column, n in enumerate(cardinalities):
            counts[column] += np.bincount(chunk[:, column], minlength=n)[:n]
    return counts


def bag_counts(split: Split, bags: list[dict[str, Any]]) -> dict[str, Tensor]:
    """How often each id occurs in each multi-hot feature of ``split`` (every rank counts all of it: one pass)."""
    counts = {}
    for bag in bags:
        values, n = split.bags[bag["name"]][0], int(bag["cardinality"])
        total = np.zeros(n, dtype=np.int64)
        for start in range(0, len(values), 1 << 22):
            total += np.bincount(np.asarray(values[start : start + (1 << 22)]), minlength=n)[:n]
        counts[bag["name"]] = torch.from_numpy(total)
    return counts


def counted_by_every_rank(split: Split, cardinalities: list[int]) -> list[np.ndarray]:
    """:func:`id_counts` of the whole split; under torchrun each rank counts its part and the counts are summed."""
    counts = id_counts(split, cardinalities, rows=distributed.shard(0, len(split)))
    if distributed.world_size() == 1:
        return counts
    total = distributed.all_reduce_sum(torch.from_numpy(np.concatenate(counts)))  # one collective for all features
    return [part.numpy() for part in torch.split(total, cardinalities)]


def train_frequencies(
    config: TrainConfig, train: Split, cardinalities: list[int], bags: list[dict[str, Any]]
) -> dict[str, Tensor] | None:
    """The id counts of the train split by feature name, where the method needs them (offline methods); else None."""
    if not any_method(config.method, "needs_frequencies"):
        return None
    frequencies = {f"C{i + 1}": torch.from_numpy(c) for i, c in enumerate(counted_by_every_rank(train, cardinalities))}
    frequencies.update(bag_counts(train, bags))
    return frequencies


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model under DDP: the MLPs' gradients are DDP's; the tables' (sparse: DDP buckets sparse gradients only
    from nn.Embedding) are averaged after backward (distributed.average_gradients); sketches, pointers and other
    buffers stay identical because every rank applies the same gathered updates (compemb.distributed)."""
    tables = {name for name, m in model.named_modules() if isinstance(m, CompressedEmbedding)}
    ignored = [
        f"{module}.{name}"
        for module in tables
        for name, _ in [
            *model.get_submodule(module).named_parameters(recurse=False),
            *model.get_submodule(module).named_buffers(recurse=False),
        ]
    ]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False
    )


def table_options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``method``, less the schedule options (:data:`SCHEDULE_OPTIONS`) it does not take.

    A sweep gives every method the same options; ``cluster_every`` only means something to methods that cluster.
    """
    if is_per_feature(method):  # each part carries its own options
        return {}
    takes = method_options(get_method(method))
    return {key: value for key, value in options.items() if key not in SCHEDULE_OPTIONS or key in takes}


def refuse_what_memory_cannot_hold(config: TrainConfig, cardinalities: list[int], num_dense: int) -> None:
    """ValueError, before anything is allocated, where the model's parameters alone (tables at their budget, MLPs)
    would not fit in this machine's memory: a full 1e9-row table would otherwise allocate for many seconds, then die."""
    full = sum(cardinalities) * config.embedding_dim * 4
    tables = (
        config.num_params * 4
        if config.num_params is not None
        else full / config.compression
        if config.compression is not None
        else full
    )
    widths = [num_dense, *config.bottom]
    mlp = sum((a + 1) * b for a, b in zip(widths, widths[1:])) * 4
    interactions = len(cardinalities) + 1
    top_in = config.bottom[-1] + interactions * (interactions - 1) // 2
    tops = [top_in, *config.top, 1]
    mlp += sum((a + 1) * b for a, b in zip(tops, tops[1:])) * 4
    memory = machine_memory_bytes()
    if memory is None:  # not known here: nothing to compare with
        return
    needed = tables + mlp
    if needed > memory:
        raise ValueError(
            f"the model's parameters alone need {needed / 1e9:,.1f} GB (tables {tables / 1e9:,.1f} GB) "
            f"and this machine has {memory / 1e9:,.1f} GB: compress more or use smaller widths"
        )


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The config's optimizer: one for every parameter, or (``table_optimizer``/``table_lr`` differing from
    ``optimizer``/``lr``) the MLPs' and the tables' own, combined (:class:`compemb.optim.CombinedOptimizer`)."""
    table_name = config.table_optimizer or config.optimizer
    table_lr = config.lr if config.table_lr is None else config.table_lr
    if table_name == config.optimizer and table_lr == config.lr:
        return one_optimizer(config.optimizer, list(model.parameters()), config.lr)
    tables = {id(p) for m in model.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in tables]
    table_parameters = [p for p in model.parameters() if id(p) in tables]
    return CombinedOptimizer(
        [one_optimizer(config.optimizer, dense, config.lr), one_optimizer(table_name, table_parameters, table_lr)]
    )


def set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """Every group's lr as the config says (the tables' groups ``table_lr`` under a combined optimizer)."""
    children = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for child, lr in zip(children, (config.lr, config.lr if config.table_lr is None else config.table_lr)):
        for group in child.param_groups:
            group["lr"] = lr


def one_optimizer(name: str, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    if name == "adagrad":
        return RowAdagrad(parameters, lr=lr)
    if name == "rowwise_adagrad":
        return RowwiseAdagrad(parameters, lr=lr)
    if name == "adam":  # tables (sparse gradients) update only the rows a batch touched
        return RowAdam(parameters, lr=lr)
    adam = torch.optim.Adam(parameters, lr=lr)  # "adam_dense": every row of every table, every step
    track_row_steps(adam)  # rows that change owner (CAFE, CCE) keep their own Adam step, across resumes too
    return adam
