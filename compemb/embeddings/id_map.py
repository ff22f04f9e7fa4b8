"""Sorted id maps with a hashed fallback: the id -> row lookup of the offline baseline, AdaEmbed and CCE's holders.

A method that gives rows to a chosen set of ids stores their ids sorted (int64; free entries hold :data:`NO_ID`,
which sorts after every real id) and, where rows are not the positions, the rows beside them. A lookup
binary-searches the ids; an id not found reads ``offset + hash(id)``: its row in a hashed table.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from compemb.hashing import UniversalHash, bucket_of
from compemb.kernels import on_host

NO_ID = torch.iinfo(torch.int64).max  # free map entries: sorts after every id in [0, n)
_NO_ROWS = np.empty(0, dtype=np.int32)


@numba.njit(cache=True, nogil=True)
def _search_rows_kernel(ids, sorted_ids, sorted_rows, a, b, num_buckets, offset, out):
    """An id found among ``sorted_ids`` reads its row (``sorted_rows``, or its position if empty), else a hashed one."""
    n, m = sorted_ids.shape[0], ids.shape[0]
    positional = sorted_rows.shape[0] == 0
    group = 16
    low = np.zeros(group, dtype=np.int64)
    for start in range(0, m, group):
        size = min(group, m - start)
        low[:size] = 0
        length = n
        # binary searches of 16 ids in step: each is a chain of dependent loads, and 16 chains overlap (3x faster
        # on a fresh batch than one search after the other, which waits on every load)
        while length > 1:
            half = length >> 1
            for j in range(size):
                low[j] += half * np.int64(sorted_ids[low[j] + half - 1] < ids[start + j])
            length -= half
        for j in range(size):
            x = np.int64(ids[start + j])
            at = low[j] + (1 if n > 0 and sorted_ids[low[j]] < x else 0)  # the first position >= x
            if at < n and sorted_ids[at] == x:
                out[start + j] = at if positional else sorted_rows[at]
            else:
                out[start + j] = offset + bucket_of(a * x + b, num_buckets)


def search_rows(
    ids: Tensor, sorted_ids: Tensor, sorted_rows: Tensor | None, hash_module: UniversalHash, offset: int
) -> Tensor:
    """Rows of ``ids``: found in ``sorted_ids`` -> ``sorted_rows`` (or the position), else ``offset + hash(id)``."""
    if on_host(ids) and not sorted_ids.is_meta:
        out = torch.empty(ids.shape, dtype=torch.int64)
        a, b = (int(v) for v in hash_module.coefficients[0].tolist())
        _search_rows_kernel(
            ids.numpy(),
            sorted_ids.numpy(),
            _NO_ROWS if sorted_rows is None else sorted_rows.numpy(),
            a,
            b,
            hash_module.num_buckets,
            offset,
            out.numpy(),
        )
        return out
    return search_rows_torch(ids, sorted_ids, sorted_rows, hash_module, offset)


def search_rows_torch(
    ids: Tensor, sorted_ids: Tensor, sorted_rows: Tensor | None, hash_module: UniversalHash, offset: int
) -> Tensor:
    """:func:`search_rows` in torch ops, for any device."""
    position = torch.searchsorted(sorted_ids, ids.contiguous()).clamp_max_(sorted_ids.numel() - 1)
    found = sorted_ids[position] == ids
    row = position if sorted_rows is None else sorted_rows[position].long()
    return torch.where(found, row, hash_module(ids).squeeze(-1) + offset)
