"""The host k-means of :mod:`compemb.cluster` (see its docstring): a seeded sample, uniform or density seeds, then
Lloyd's iterations whose assignment step looks at a k-NN graph of the centroids (or searches every centroid with
faiss), and empty clusters refilled by splitting big ones."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import Tensor

from compemb.cluster.kernels import Runner, accumulate_clusters
from compemb.cluster.search import as_points, check_choice, knn_graph, nearest
from compemb.cluster.shared import SPLIT_EPS, KMeansResult

SEARCHES = ("graph", "flat", "hnsw")
INITS = ("density", "random")
COARSE_MIN_K = 1024  # above this, first labels: nearest of max(256, k/32) seeds, then graph steps


def kmeans(
    points: Tensor | np.ndarray,
    k: int,
    *,
    niter: int = 50,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    search: str = "graph",
    neighbors: int = 16,
    init: str = "random",
    threads: int | None = None,
) -> KMeansResult:
    """k centroids of ``points`` (n, d) by Lloyd's algorithm on at most ``max_points_per_centroid * k`` of them.

    Args:
        points: (n, d) float tensor or array; converted to float32.
        k: number of centroids. With ``n <= k`` the centroids are the points themselves, in order, then copies
            (row ``i`` is point ``i % n``): inertia 0, no iteration, no NaN.
        niter: Lloyd iterations (update, then assignment); stops early once no label changes.
        max_points_per_centroid: training sample size per centroid (uniform, seeded, without replacement).
        seed: seeds the sample, the seeds and the splits of empty clusters; same inputs + seed, same result.
        search: assignment step: ``"graph"`` (candidates from the centroids' k-NN graph, default), ``"flat"``
            (exact, faiss ``IndexFlatL2``) or ``"hnsw"`` (faiss ``IndexHNSWFlat``).
        neighbors: candidates per point besides its current centroid, for ``"graph"``.
        init: ``"random"`` (k uniform sample points, as faiss; default) or ``"density"`` (see the module docstring).
        threads: threads for the graph steps (default ``torch.get_num_threads()``); faiss uses its own.

    Shape:
        points (n, d) -> centroids (k, d) float32; labels (s,) int64 with s = min(n, max_points_per_centroid * k).

    Memory: besides ``points``, a float32 copy of the s training points (sorted by label) and ~28 bytes per training
    point (labels, distances, order), plus ~70 bytes per centroid (graph, sums).
    """
    x = as_points(points, "points")
    n, d = x.shape
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an int >= 1, got {k!r}") from None
    if k < 1 or isinstance(k, bool):
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if niter < 0 or max_points_per_centroid < 1 or neighbors < 1:
        raise ValueError(
            f"need niter >= 0, max_points_per_centroid >= 1 and neighbors >= 1, got niter={niter}, "
            f"max_points_per_centroid={max_points_per_centroid}, neighbors={neighbors}"
        )
    check_choice("search", search, SEARCHES)
    check_choice("init", init, INITS)
    if n <= k:  # nothing to cluster: every point is its own centroid
        centroids = torch.from_numpy(x[np.arange(k) % n].copy())
        return KMeansResult(centroids, torch.arange(n), None, 0.0)
    rng = np.random.default_rng(seed)
    sample = (
        np.sort(rng.choice(n, max_points_per_centroid * k, replace=False)) if n > max_points_per_centroid * k else None
    )
    s = x if sample is None else x[sample]
    c = _seeds(s, k, init, rng)
    with Runner(threads) as run:
        c, labels, objective = _lloyd(s, c, niter, search, min(neighbors, k - 1) + 1, rng, run)
    return KMeansResult(
        torch.from_numpy(c),
        torch.from_numpy(labels),
        None if sample is None else torch.from_numpy(sample),
        objective[-1],
        objective[1:],
        len(objective) - 1,
    )


def _seeds(s: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """k initial centroids from the training points (see the module docstring)."""
    perm = rng.permutation(len(s))
    first = s[perm[:k]]
    pool = perm[k : 5 * k]
    if init == "random" or len(pool) < k:
        return first.copy()
    cell, dist = nearest(s[pool], first, "flat")
    power = s.shape[1] / (s.shape[1] + 2)
    # a point's weight is its cell's (Voronoi cell of the uniform draw) distortion^power shared among its points:
    # cells then get seeds ~ (n V^(2/d))^power ~ p^power V, the optimum; per-point weights D(x)^power (no sharing)
    # would send every seed of a cell to a far-off uncovered cluster
    total = np.bincount(cell, weights=dist, minlength=k)
    weight = total[cell] ** power / np.bincount(cell, minlength=k)[cell]
    # k draws without replacement, probability ~ weight: the k largest log(u) / weight (Efraimidis & Spirakis)
    with np.errstate(divide="ignore"):
        keys = np.log(rng.random(len(pool))) / weight  # weight 0 (a duplicate of a first seed): -inf, drawn last
    return s[np.sort(pool[np.argpartition(-keys, k - 1)[:k]])]


def _lloyd(
    s: np.ndarray, c: np.ndarray, niter: int, search: str, width: int, rng: np.random.Generator, run: Runner
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Lloyd's iterations from seeds ``c``: (centroids, labels, objective after the first labels and each iteration)."""
    k = len(c)
    if search == "graph":
        graph = run.refine(c, knn_graph(c, width))
        subset = (
            np.sort(rng.choice(k, max(COARSE_MIN_K // 4, k // 32), replace=False)) if k > COARSE_MIN_K else np.arange(k)
        )
        labels, dist = nearest(s, c[subset], "flat")
        labels = subset[labels]
        for _ in range(10 if len(subset) < k else 0):  # greedy graph descent to the nearest seed
            if run.reassign(s, c, graph, labels, dist) <= len(s) // 1000:
                break
        # sorting the points by label makes each thread's centroid and graph reads nearly sequential (5x faster)
        order = np.argsort(labels, kind="stable")
        s, labels, dist = s[order], labels[order], dist[order]
    else:
        labels, dist = nearest(s, c, search)
        graph, order = None, None
    objective = [float(dist.mean(dtype=np.float64))]
    for _ in range(niter):
        c, counts, spread = _update(s, labels, c)  # centroids = means of their points; empty ones split a big one
        split = _split_empty(c, counts, spread, rng, graph)
        if graph is not None:
            graph = run.refine(c, graph)  # centroids move little: their new neighbours are within two hops
            changed = run.reassign(s, c, graph, labels, dist)
        else:
            new_labels, dist = nearest(s, c, search)
            changed, labels = int(np.count_nonzero(new_labels != labels)), new_labels
        objective.append(float(dist.mean(dtype=np.float64)))
        if changed == 0 and split == 0:
            break
    if order is not None:  # back to sample order
        labels = labels[np.argsort(order, kind="stable")]
    return c, labels.astype(np.int64), objective


def _update(s: np.ndarray, labels: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means of the clusters (old centroid where empty), sizes, mean squared distance of the points to their mean)."""
    sums, squares, counts = np.zeros(c.shape, np.float64), np.zeros(len(c), np.float64), np.zeros(len(c), np.int64)
    accumulate_clusters(
        s, labels, sums, squares, counts
    )  # one thread, one order: the same sums whatever the thread count
    new = c.copy()
    full = counts > 0
    mean = sums[full] / counts[full, None]
    new[full] = mean.astype(np.float32)
    spread = np.zeros(len(c))
    mean_square = squares[full] / counts[full]
    variance = mean_square - (mean**2).sum(1)
    spread[full] = np.where(variance > 1e-12 * mean_square, variance, 0.0)  # all points equal: 0, not rounding
    return new, counts, spread


def _split_empty(
    c: np.ndarray, counts: np.ndarray, spread: np.ndarray, rng: np.random.Generator, graph: np.ndarray | None
) -> int:
    """Refill each empty cluster by splitting a big one in two (faiss's rule); returns how many were refilled."""
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return 0
    # a cluster of p points is chosen ~ p - 1 (faiss), unless its points are all equal: splitting those would only
    # jitter their centroid, every iteration (faiss does). All draws at once: O(k + empty) rather than O(k * empty)
    weight = np.where(spread > 0, np.maximum(counts - 1, 0), 0).astype(np.float64)
    if weight.sum() == 0:
        return 0  # nothing can be split: the empty ones keep their old centroids
    chosen = np.searchsorted(np.cumsum(weight), rng.random(len(empty)) * weight.sum(), side="right")
    sign = np.where(np.arange(c.shape[1]) % 2 == 0, 1.0, -1.0)
    for e, j in zip(empty.tolist(), chosen.tolist()):
        delta = (SPLIT_EPS * sign * (np.abs(c[j]) + np.sqrt(spread[j]))).astype(np.float32)
        c[e], c[j] = c[j] + delta, c[j] - delta
        if graph is not None:  # e starts from j's neighbourhood and j sees e: the refinement then places e
            graph[e] = graph[j]
            graph[e, 0], graph[e, -1], graph[j, -1] = e, j, e
    return len(empty)
