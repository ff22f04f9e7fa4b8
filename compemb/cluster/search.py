"""Exact (or HNSW) nearest-centroid search on the host: faiss where it is installed, torch ops otherwise; the
input checks and the centroids' first k-NN graph of :mod:`compemb.cluster`'s host k-means."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compemb.cluster.shared import TORCH_BLOCK

faiss: ModuleType | None  # None where faiss is not installed
try:
    import faiss as _faiss

    faiss = _faiss
except ImportError:  # the torch fallback below does the same searches, exactly and more slowly
    faiss = None


INDEXES = ("flat", "hnsw")
EXACT_GRAPH_MAX_K = 8192  # up to here the centroids' first k-NN graph is exact (k^2 distances); above, faiss HNSW
HNSW_M, HNSW_EF = 32, 64  # assign(index="hnsw"): recall ~0.999 at d=4, k=50,000


def assign(
    points: Tensor | np.ndarray, centroids: Tensor | np.ndarray, *, batch_size: int = 1 << 18, index: str = "flat"
) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each point: (labels int64 (n,), squared distances float32 (n,)).

    ``index="flat"`` (default) is exact (faiss ``IndexFlatL2``; ties may go to either centroid); ``"hnsw"`` is
    approximate (faiss ``IndexHNSWFlat``, M=32, efSearch=64; at d=4 and k=50,000 measured 6x slower than flat).
    Points go through in batches of ``batch_size``, never an n x k matrix: peak memory per batch is about
    ``batch_size * (8 d + 12)`` bytes (faiss's labels and distances, the centroid rows and differences for the exact
    distances) plus faiss's fixed-size blocks (at most 4096 x 1024 floats, 16 MiB); the torch fallback (no faiss)
    computes at most 2^24 distances (64 MiB) at a time.
    """
    x, c = as_points(points, "points"), as_points(centroids, "centroids")
    if x.shape[1] != c.shape[1] or len(c) == 0:
        raise ValueError(
            f"points are {x.shape[1]}-dimensional and centroids {tuple(c.shape)}; need (k >= 1, {x.shape[1]})"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_choice("index", index, INDEXES)
    labels, dist = nearest(x, c, index, batch_size)
    return torch.from_numpy(labels), torch.from_numpy(dist)


def as_points(points: Tensor | np.ndarray, name: str) -> np.ndarray:
    """``points`` as a contiguous float32 (n, d) array; ValueError for another shape or non-finite values."""
    x = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (n, d) array, got shape {tuple(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():  # faiss would quietly produce garbage (or abort) on them
        raise ValueError(f"{name} hold non-finite values")
    return x


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming the allowed values where ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; available: {', '.join(allowed)}")


def nearest(x: np.ndarray, c: np.ndarray, index: str, batch_size: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Exact (``flat``) or HNSW nearest centroid of every row of ``x``, in batches."""
    labels, dist = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    if faiss is None:
        if index != "flat":
            raise ValueError(f"index={index!r} needs faiss, which is not installed; use index='flat'")
        ct, c_sq = torch.from_numpy(c), torch.from_numpy(c).square().sum(1)
        step = max(1, min(batch_size, TORCH_BLOCK // len(c)))
        for start in range(0, len(x), step):
            xt = torch.from_numpy(x[start : start + step])
            labels[start : start + step] = torch.addmm(c_sq, xt, ct.T, alpha=-2).argmin(1).numpy()  # + |x|^2
    else:
        searcher = faiss_index(c, index)
        step = batch_size
        for start in range(0, len(x), step):
            labels[start : start + step] = searcher.search(x[start : start + step], 1)[1][:, 0]
    for start in range(0, len(x), step):
        # exact |x - c|^2, not |x|^2 - 2xc + |c|^2 (which cancels badly): the same value whatever the batch
        diff = x[start : start + step] - c[labels[start : start + step]]
        dist[start : start + step] = np.einsum("ij,ij->i", diff, diff)
    return labels, dist


def faiss_index(c: np.ndarray, kind: str, hnsw_m: int = HNSW_M, hnsw_ef: int = HNSW_EF) -> Any:
    """A faiss index of the centroids ``c``: ``"flat"`` (exact) or ``"hnsw"`` (built on one thread)."""
    assert faiss is not None  # its callers search with torch where faiss is not installed
    if kind == "flat":
        index = faiss.IndexFlatL2(c.shape[1])
        index.add(c)
        return index
    index = faiss.IndexHNSWFlat(c.shape[1], hnsw_m)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a multi-threaded HNSW build depends on thread timing: not reproducible
    try:
        index.add(c)
    finally:
        faiss.omp_set_num_threads(threads)
    index.hnsw.efSearch = hnsw_ef
    return index


def knn_graph(c: np.ndarray, m: int) -> np.ndarray:
    """(k, m) int32: each centroid's m nearest centroids (itself usually first); exact up to EXACT_GRAPH_MAX_K."""
    if faiss is not None:
        # the first graph only seeds the refinement: a light HNSW (M=16) finds ~all true neighbours at d=4
        index = faiss_index(c, "flat" if len(c) <= EXACT_GRAPH_MAX_K else "hnsw", 16, max(32, 2 * m))
        return index.search(c, m)[1].astype(np.int32)
    ct, out = torch.from_numpy(c), np.empty((len(c), m), np.int32)
    step = max(1, TORCH_BLOCK // len(c))
    for start in range(0, len(c), step):
        out[start : start + step] = torch.cdist(ct[start : start + step], ct).topk(m, largest=False).indices.numpy()
    return out
