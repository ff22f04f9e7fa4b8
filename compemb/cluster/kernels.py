"""The compiled kernels of the host k-means' graph steps (numba, CPU) and the runner that spreads them over a few
threads: reassign each point among its centroid's graph neighbours, refine the centroids' k-NN graph from two-hop
neighbourhoods, and the clusters' sums in one fixed order."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch


class Runner:
    """Runs the compiled kernels over chunks of rows on a few threads (the kernels release the GIL)."""

    MIN_WORK = 1 << 20  # distances below which one thread is faster than waking others

    def __init__(self, threads: int | None) -> None:
        self.threads = max(1, threads or torch.get_num_threads())
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _map(self, n: int, work: int, kernel: Callable[[int, int], int]) -> int:
        if self.pool is None or work < self.MIN_WORK:
            return kernel(0, n)
        bounds = np.linspace(0, n, 4 * self.threads + 1).astype(np.int64).tolist()
        return sum(self.pool.map(kernel, bounds[:-1], bounds[1:]))

    def reassign(self, s: np.ndarray, c: np.ndarray, graph: np.ndarray, labels: np.ndarray, dist: np.ndarray) -> int:
        """Move each point to the nearest centroid of its centroid's graph row; returns how many moved."""
        return self._map(len(s), len(s) * graph.shape[1], lambda a, b: _reassign(s, c, graph, labels, dist, a, b))

    def refine(self, c: np.ndarray, graph: np.ndarray) -> np.ndarray:
        """The centroids' k-NN graph refined from each row's two-hop neighbourhood."""
        out = np.empty((len(c), graph.shape[1]), np.int32)
        self._map(len(c), len(c) * graph.shape[1] ** 2, lambda a, b: _refine(c, graph, out, a, b))
        return out


# --- compiled kernels -----------------------------------------------------------------------------------------


@numba.njit(inline="always")
def _sq_dist(x, i, c, j, d):
    if d == 4:  # CCE's usual column width, unrolled: 1.6x faster than the loop
        a0, a1, a2, a3 = x[i, 0] - c[j, 0], x[i, 1] - c[j, 1], x[i, 2] - c[j, 2], x[i, 3] - c[j, 3]
        return a0 * a0 + a1 * a1 + a2 * a2 + a3 * a3
    s = np.float32(0.0)
    for a in range(d):
        diff = x[i, a] - c[j, a]
        s += diff * diff
    return s


@numba.njit(cache=True, nogil=True)
def _reassign(x, c, graph, labels, dist, start, stop):
    # each point moves to the nearest of its centroid's graph row (which holds the centroid itself)
    m, d, changed = graph.shape[1], x.shape[1], 0
    for i in range(start, stop):
        cur = labels[i]
        best, best_d = cur, _sq_dist(x, i, c, cur, d)
        for t in range(m):
            j = graph[cur, t]
            s = _sq_dist(x, i, c, j, d)
            if s < best_d:
                best, best_d = j, s
        if best != cur:
            changed += 1
        labels[i], dist[i] = best, best_d
    return changed


@numba.njit(cache=True, nogil=True)
def _refine(c, graph, out, start, stop):
    # row j <- itself, then the m - 1 nearest centroids among the rows of its neighbours (two hops)
    k, m, d = graph.shape[0], graph.shape[1], c.shape[1]
    seen = np.full(k, -1, np.int64)
    best_d, best = np.empty(m, np.float32), np.empty(m, np.int32)
    for j in range(start, stop):
        best_d[:] = np.inf
        best[:] = j  # rows with fewer than m candidates (k small) are padded with j itself
        best_d[0] = 0.0
        seen[j] = j
        for t in range(m):
            for u in range(m):
                q = graph[graph[j, t], u]
                if seen[q] == j:
                    continue
                seen[q] = j
                s = _sq_dist(c, j, c, q, d)
                if s < best_d[m - 1]:
                    p = m - 1
                    while p > 1 and best_d[p - 1] > s:
                        best_d[p], best[p] = best_d[p - 1], best[p - 1]
                        p -= 1
                    best_d[p], best[p] = s, q
        out[j] = best
    return 0


@numba.njit(cache=True, nogil=True)
def accumulate_clusters(x, labels, sums, squares, counts):
    """Add each point to its cluster's count, coordinate sums and sum of squares (float64), in point order."""
    for i in range(x.shape[0]):
        j = labels[i]
        counts[j] += 1
        for a in range(x.shape[1]):
            v = np.float64(x[i, a])
            sums[j, a] += v
            squares[j] += v * v
