"""A minimal hand-written DLRM loop: the reference ``compemb train`` is held to (quality here, speed later).

It shares nothing with compemb's model or trainer: one ``torch.nn.Embedding`` per feature initialised as the
DLRM reference does (U(-sqrt(1/n), sqrt(1/n)) for a table of n ids), its own MLPs and dot interaction, batches
read straight from the memory-mapped split in file order, and one evaluation at the end. The architecture is
the one compemb's DLRM builds (bottom MLP to the embedding dim, every unordered pair of the dense vector and
the embeddings once, the dense vector beside the products into the top MLP), so the two differ only where
compemb adds something.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from compemb.data.dataset import open_dataset
from compemb.metrics import auc, bce


@dataclass(frozen=True)
class PlainConfig:
    """The settings of one plain run (the subset of :class:`~compemb.train.TrainConfig` a plain loop has)."""

    data: str
    embedding_dim: int = 16
    bottom: tuple[int, ...] = (256, 64)
    top: tuple[int, ...] = (256, 64)
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 1
    seed: int = 0
    init: str = "dlrm"  # "dlrm": U(+-sqrt(1/n)); "uniform_dim": U(+-1/sqrt(d))


def _layers(in_features: int, widths: Sequence[int], last_relu: bool) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for index, width in enumerate(widths):
        layers += [torch.nn.Linear(in_features, width)]
        if last_relu or index < len(widths) - 1:
            layers += [torch.nn.ReLU()]
        in_features = width
    return torch.nn.Sequential(*layers)


class PlainDLRM(torch.nn.Module):
    """DLRM over one plain ``nn.Embedding`` per feature."""

    pairs: Tensor  # (2, pairs) the interaction's index pairs (a buffer)

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        dim: int,
        bottom: Sequence[int],
        top: Sequence[int],
        init: str,
    ) -> None:
        super().__init__()
        tables = [torch.nn.Embedding(n, dim) for n in cardinalities]
        for table, n in zip(tables, cardinalities):
            bound = math.sqrt(1 / n) if init == "dlrm" else 1 / math.sqrt(dim)
            torch.nn.init.uniform_(table.weight, -bound, bound)
        self.tables = torch.nn.ModuleList(tables)
        self.bottom = _layers(num_dense, [*bottom, dim], last_relu=True)
        vectors = len(cardinalities) + 1
        self.top = _layers(dim + vectors * (vectors - 1) // 2, [*top, 1], last_relu=False)
        # a buffer: it moves with the model, so a step on the device indexes with device indices
        self.register_buffer("pairs", torch.triu_indices(vectors, vectors, offset=1), persistent=False)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """Click logits ``(batch,)``."""
        x = self.bottom(dense)
        vectors = torch.stack([x, *(table(sparse[:, i]) for i, table in enumerate(self.tables))], dim=1)
        products = vectors @ vectors.transpose(1, 2)
        return self.top(torch.cat([x, products[:, self.pairs[0], self.pairs[1]]], dim=1)).squeeze(-1)


def _tensors(split, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.from_numpy(np.array(split.dense[start:stop], dtype=np.float32)),
        torch.from_numpy(np.array(split.sparse[start:stop], dtype=np.int64)),
        torch.from_numpy(np.array(split.labels[start:stop], dtype=np.float32)),
    )


def train_plain(config: PlainConfig) -> dict[str, float]:
    """Train ``config`` once; return the test BCE and AUC at the end and the training samples/s."""
    manifest, splits = open_dataset(config.data)
    torch.manual_seed(config.seed)
    train = splits["train"]
    model = PlainDLRM(
        manifest["cardinalities"], train.dense.shape[1], config.embedding_dim, config.bottom, config.top, config.init
    )
    optimizers = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    optimizer = optimizers[config.optimizer](model.parameters(), lr=config.lr)
    started = time.perf_counter()
    for _ in range(config.epochs):
        for start in range(0, len(train), config.batch_size):
            dense, sparse, labels = _tensors(train, start, start + config.batch_size)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    model.eval()
    test = splits["test"]
    with torch.no_grad():
        logits = torch.cat([model(*_tensors(test, s, s + 16_384)[:2]) for s in range(0, len(test), 16_384)])
    labels = torch.from_numpy(np.asarray(test.labels, dtype=np.float32))
    return {
        "test_bce": bce(logits, labels),
        "test_auc": auc(logits, labels),
        "samples_per_s": len(train) * config.epochs / seconds,
    }
