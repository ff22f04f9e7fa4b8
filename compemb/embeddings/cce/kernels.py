"""CCE's compiled CPU path: routing ids to T0/T1 rows, the gather of their sums, and its backward.

On CPU a lookup is one compiled call (route, then gather T0 + T1 per column, sweeping small tables into cache
first) and its backward another (:class:`PairGather`); :class:`~compemb.embeddings.cce.embedding.CCEmbedding` uses torch ops
(the same rows) elsewhere.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from compemb.hashing import bucket_of

NO_HOLDERS = np.zeros(0, dtype=np.int64)  # the holder_ids argument when every id holds pointers
# the routing arguments of route_rows and _forward_kernel after the ids: mode, pointers, holder ids, h0's, h1's and
# cold1's coefficients (numpy views), k, cold_offset, the hashed and the holder rows
Routing = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int, int, int]


@numba.njit(cache=True, nogil=True)
def route_rows(ids, mode, pointers, holder_ids, h0, h1, cold1, k, cold_offset, cold_k, hot_k, out):
    """Rows ``(N, c, 2)`` of the stored table each id reads: T0's row, T1's row, per column.

    Mode 0 (no clustering yet) and ids without stored pointers: T0 row ``cold_offset + h0(x)`` and T1 row
    ``cold_offset + cold1(x)`` (the hashed region, which clustering never writes). Ids with stored pointers (mode 1:
    every id, row x; mode 2: the ids of the sorted ``holder_ids``, found by binary search): T0 row ``pointer`` (a
    centroid) and T1 row ``h1(x)`` (the residual, re-hashed each round). ``h0``/``cold1`` hash into ``cold_k`` buckets,
    ``h1`` into ``hot_k``.
    """
    c = h0.shape[0]
    m = holder_ids.shape[0]
    for i in range(ids.shape[0]):
        x = np.int64(ids[i])
        row = -1  # the id's row of stored pointers, -1: hashed
        if mode == 1:
            row = x
        elif mode == 2:
            low, high = 0, m
            while low < high:
                middle = (low + high) >> 1
                if holder_ids[middle] < x:
                    low = middle + 1
                else:
                    high = middle
            if low < m and holder_ids[low] == x:
                row = low
        for j in range(c):
            if row >= 0:
                out[i, j, 0] = j * k + np.int64(pointers[row, j])
                out[i, j, 1] = (c + j) * k + bucket_of(h1[j, 0] * x + h1[j, 1], hot_k)
            else:
                out[i, j, 0] = j * k + cold_offset + bucket_of(h0[j, 0] * x + h0[j, 1], cold_k)
                out[i, j, 1] = (c + j) * k + cold_offset + bucket_of(cold1[j, 0] * x + cold1[j, 1], cold_k)


# The kernels below work on the ``(N * c * 2)`` flat rows and ``(N * c, w)`` sub-vectors; their inner loops run
# over blocks of 4 floats written out, which numba compiles ~2.5x faster than a loop over a runtime width.


@numba.njit(cache=True, nogil=True)
def _gather_kernel(rows, weight, out):
    """``out[p] = weight[rows[2p]] + weight[rows[2p + 1]]``: each (id, column) sums its T0 and T1 rows."""
    width = weight.shape[1]
    blocks = width // 4
    for p in range(out.shape[0]):
        a, b = rows[2 * p], rows[2 * p + 1]
        for q in range(blocks):
            u = 4 * q
            out[p, u] = weight[a, u] + weight[b, u]
            out[p, u + 1] = weight[a, u + 1] + weight[b, u + 1]
            out[p, u + 2] = weight[a, u + 2] + weight[b, u + 2]
            out[p, u + 3] = weight[a, u + 3] + weight[b, u + 3]
        for u in range(4 * blocks, width):
            out[p, u] = weight[a, u] + weight[b, u]


@numba.njit(cache=True, nogil=True)
def _touch(array, accesses):
    """Read one value per 64-byte line of ``array`` when ``accesses`` random reads would touch most lines anyway.

    Tables evicted between steps (26 features, or the model's other work) cost one cache miss per random read;
    a sequential sweep, which the hardware prefetcher streams, loads them for a fraction of that (the lookup
    benchmark runs ~1.35x faster with it). Returns a sum so the reads are not optimised away.
    """
    flat = array.reshape(-1)
    total = 0.0
    if flat.shape[0] * flat.itemsize <= 128 * accesses:
        for i in range(0, flat.shape[0], max(1, 64 // flat.itemsize)):
            total += flat[i]
    return total


@numba.njit(cache=True, nogil=True)
def _forward_kernel(ids, mode, pointers, holder_ids, h0, h1, cold1, k, cold_offset, cold_k, hot_k, weight, rows, out):
    """Route and gather in one call: ``rows`` ``(N, c, 2)`` as :func:`route_rows`, ``out`` ``(N * c, w)``."""
    n, c = ids.shape[0], h0.shape[0]
    touched = 0.0
    if mode == 2:
        touched += _touch(holder_ids, n)
    if mode != 0:
        touched += _touch(pointers, n * c)
    route_rows(ids, mode, pointers, holder_ids, h0, h1, cold1, k, cold_offset, cold_k, hot_k, rows)
    touched += _touch(weight, 2 * n * c)
    _gather_kernel(rows.reshape(-1), weight, out)
    return touched


@numba.njit(cache=True, nogil=True)
def mark_seen(ids, bitmap):
    """Set the bit of every id in ``bitmap`` (8 ids per byte)."""
    for i in range(ids.shape[0]):
        bitmap[ids[i] >> 3] |= np.uint8(1 << (ids[i] & 7))


@numba.njit(cache=True, nogil=True)
def _spread_kernel(grad, values):
    """The sparse gradient's values: each (id, column)'s gradient once per row it read, ``values[2p + t] = grad[p]``."""
    width = grad.shape[1]
    blocks = width // 4
    for p in range(grad.shape[0]):
        for q in range(blocks):
            u = 4 * q
            v0, v1, v2, v3 = grad[p, u], grad[p, u + 1], grad[p, u + 2], grad[p, u + 3]
            values[2 * p, u], values[2 * p, u + 1], values[2 * p, u + 2], values[2 * p, u + 3] = v0, v1, v2, v3
            values[2 * p + 1, u], values[2 * p + 1, u + 1] = v0, v1
            values[2 * p + 1, u + 2], values[2 * p + 1, u + 3] = v2, v3
        for u in range(4 * blocks, width):
            values[2 * p, u] = grad[p, u]
            values[2 * p + 1, u] = grad[p, u]


@numba.njit(cache=True, nogil=True)
def _scatter_kernel(rows, grad, dense):
    """The dense gradient: every row read adds its (id, column)'s gradient."""
    width = grad.shape[1]
    for p in range(grad.shape[0]):
        for t in range(2):
            r = rows[2 * p + t]
            for u in range(width):
                dense[r, u] += grad[p, u]


class PairGather(torch.autograd.Function):
    """CPU ids ``(N,)`` -> ``(N, c * w)``: each (id, column) sums its T0 and T1 rows; sparse (COO) or dense gradient.

    One compiled call routes and gathers; F.embedding_bag over the rows computes the same ~3x slower on rows this
    narrow (its backward copies the gradient through a strided expand).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, routing: Routing, sparse: bool) -> Tensor:
        c = routing[4].shape[0]
        rows = torch.empty(ids.numel(), c, 2, dtype=torch.int64)
        out = torch.empty(ids.numel() * c, weight.shape[1], dtype=weight.dtype)
        _forward_kernel(ids.numpy(), *routing, weight.detach().numpy(), rows.numpy(), out.numpy())
        ctx.save_for_backward(rows)
        ctx.sparse, ctx.shape = sparse, weight.shape
        return out.view(ids.numel(), c * weight.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (rows,) = ctx.saved_tensors
        grad = grad.contiguous().view(-1, ctx.shape[1])
        if ctx.sparse:
            values = torch.empty(rows.numel(), ctx.shape[1], dtype=grad.dtype)
            _spread_kernel(grad.numpy(), values.numpy())
            sparse = torch.sparse_coo_tensor(rows.view(1, -1), values, ctx.shape, check_invariants=False)
            return sparse, None, None, None
        dense = torch.zeros(ctx.shape, dtype=grad.dtype)
        _scatter_kernel(rows.view(-1).numpy(), grad.numpy(), dense.numpy())
        return dense, None, None, None
