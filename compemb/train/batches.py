"""Batches from a data set's memory-mapped splits: rows, multi-hot bags, and the tensors as the model takes them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compemb.collection import Bags
from compemb.data.dataset import Split


def read_batch(split: Split, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return read_rows(split, slice(index * batch_size, (index + 1) * batch_size))


def read_rows(split: Split, rows: slice | np.ndarray) -> tuple[torch.Tensor, ...]:
    """Dense, sparse and labels of ``rows`` (a slice or sorted indices), then each multi-hot feature's values and
    offsets (``batch + 1``, from 0) for those rows."""
    dense = torch.from_numpy(np.array(split.dense[rows], dtype=np.float32))
    sparse = torch.from_numpy(np.array(split.sparse[rows], dtype=np.int64))
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
