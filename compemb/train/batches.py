"""Batches from a data set's memory-mapped splits: rows, multi-hot bags, and the tensors as the model takes them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from compemb import distributed
from compemb.collection import Bags
from compemb.data.dataset import Split


class TrainBatches:
    """Which rows make the training batch of each step: file order, or each epoch's seeded permutation (``shuffle``);
    under torchrun, this rank's contiguous part of it. A function of (seed, step) alone: a resumed run reads the
    batches the interrupted one would have."""

    def __init__(self, train: Split, batch_size: int, shuffle: bool, seed: int) -> None:
        self.train, self.batch_size, self.shuffle, self.seed = train, batch_size, shuffle, seed
        self.steps_per_epoch = math.ceil(len(train) / batch_size)
        self.order: tuple[int, np.ndarray] | None = None  # (epoch, its row permutation) when shuffling

    def rows(self, step: int) -> tuple[torch.Tensor, ...]:
        """The batch of 0-based ``step`` (:func:`read_rows`' tensors)."""
        train, size = self.train, self.batch_size
        epoch, index = divmod(step, self.steps_per_epoch)
        start, stop = index * size, min((index + 1) * size, len(train))
        low, high = distributed.shard(start, stop)  # under torchrun: this rank's contiguous part of the batch
        if not self.shuffle:
            return read_rows(train, slice(low, high))
        if self.order is None or self.order[0] != epoch:  # a function of (seed, epoch) alone: resumes see the same
            self.order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(train)))
        # sorted within the batch: the same rows (the loss is their mean), read in file order from the memory map
        return read_rows(train, np.sort(self.order[1][start:stop])[low - start : high - start])

    def global_rows(self, step: int) -> int:
        """How many rows the batch of 0-based ``step`` has over all ranks."""
        index = step % self.steps_per_epoch
        return min(self.batch_size, len(self.train) - index * self.batch_size)


def read_batch(split: Split, index: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    return read_rows(split, slice(index * batch_size, (index + 1) * batch_size))


def read_rows(split: Split, rows: slice | np.ndarray) -> tuple[torch.Tensor, ...]:
    """Dense, sparse and labels of ``rows`` (a slice or sorted indices), then each multi-hot feature's values and
    offsets (``batch + 1``, from 0) for those rows."""
    dense = torch.from_numpy(np.array(split.dense[rows], dtype=np.float32))
    sparse = torch.from_numpy(np.array(split.sparse[rows], dtype=np.int64))
    assert split.labels is not None  # batches are read for training and evaluation: of labelled splits only
    labels = torch.from_numpy(np.array(split.labels[rows], dtype=np.float32))
    bags = []
    for values, offsets in split.bags.values():
        picked, picked_offsets = bag_rows(values, offsets, rows)
        bags += [torch.from_numpy(picked), torch.from_numpy(picked_offsets)]
    return dense, sparse, labels, *bags


def bag_rows(values: np.ndarray, offsets: np.ndarray, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bags of ``rows`` (a slice with step 1, or row indices) of a jagged feature: their ids (int64) and their
    offsets from 0 (``len(rows) + 1``)."""
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(len(offsets) - 1)
        bounds = np.asarray(offsets[start : max(start, stop) + 1], dtype=np.int64)
        return np.array(values[bounds[0] : bounds[-1]], dtype=np.int64), bounds - bounds[0]
    starts = np.asarray(offsets[rows], dtype=np.int64)
    lengths = np.asarray(offsets[rows + 1], dtype=np.int64) - starts
    new_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # position i of the output is values[starts[row] + (i - new_offsets[row])] for the row it falls in
    positions = np.arange(new_offsets[-1]) + np.repeat(starts - new_offsets[:-1], lengths)
    return np.array(values[positions], dtype=np.int64), new_offsets


def unpack_batch(
    batch: tuple[torch.Tensor, ...], bags: list[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Bags] | None]:
    """``read_rows``' tensors as the model takes them: dense, sparse, labels and the multi-hot features' Bags."""
    dense, sparse, labels, *jagged = batch
    if not bags:
        return dense, sparse, labels, None
    return dense, sparse, labels, {bag["name"]: Bags(jagged[2 * i], jagged[2 * i + 1]) for i, bag in enumerate(bags)}
