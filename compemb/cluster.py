"""k-means for CCE's clustering step: Lloyd's algorithm whose assignment step only looks at nearby centroids.

CCE (Tsang & Ahle, "Clustering the Sketch: Dynamic Compression for Embedding Tables", NeurIPS 2023, arXiv
2210.05974) periodically runs k-means per column on the IDs' current sub-vectors (d = dim / c, often 4), k = the
table's rows, then points every ID at its nearest centroid. The paper: faiss k-means (``niter=50``,
``max_points_per_centroid=256``), then a dense distance matrix for the assignment.

Deviations, each measured in ``benchmarks/cluster.py`` (d=4): the same sample (up to 256 points per centroid, all
of them for 1M points and k=5,000), uniform seeds and 50 Lloyd iterations, but

- ``search="graph"`` (default): each assignment step compares a point only with its current centroid and that
  centroid's ``neighbors`` nearest centroids (a k-NN graph of the centroids, refreshed every iteration from its own
  two-hop neighbourhoods; Deng & Zhao 2016, "Fast k-means based on k-NN graph"). The current centroid is always a
  candidate, so the assignment step never raises the objective. At d=4 a full search costs k*d flops per point even
  through faiss's fused flat kernel (~2.3 us per point for k=50,000); a graph step ~0.03 us. Over 99% of points end
  on their exact nearest centroid. ``search="flat"`` is exact Lloyd's (faiss ``IndexFlatL2`` every iteration).
- First labels: nearest of a subset of the seeds (faiss flat), then graph steps, instead of a k-wide search.
- Empty clusters are refilled by splitting a big one, as faiss does, but never one whose points are all equal.

``init="density"`` (an option) draws the seeds ~ (distortion of their Voronoi cell among k uniform points)^(d/(d+2)),
the density that is optimal for k-means in the many-centroids regime: ~10% lower objective on a 64-Gaussian
mixture, but a few % worse on well-separated blobs with few centroids each, so uniform seeding stays the default.

:func:`assign` is an exact faiss ``IndexFlatL2`` search in memory-bounded batches (``index="hnsw"`` is approximate
and, at d=4, 6x slower). faiss does every k-wide search; without faiss, torch does them (exactly, more slowly).
Results are deterministic for a seed whatever the thread counts: per-point work is independent, the centroid sums
run in one fixed order and HNSW graphs are built on one thread.

Example::

    >>> import torch
    >>> points = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    >>> result = kmeans(points, 16, seed=0)
    >>> result.centroids.shape, result.labels.shape, result.sample is None
    (torch.Size([16, 4]), torch.Size([2000]), True)
    >>> labels, distances = assign(points, result.centroids)
    >>> bool((labels == result.labels).float().mean() > 0.99)
    True
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from torch import Tensor

try:
    import faiss
except ImportError:  # the torch fallback below does the same searches, exactly and more slowly
    faiss = None

SEARCHES = ("graph", "flat", "hnsw")
INITS = ("density", "random")
INDEXES = ("flat", "hnsw")
COARSE_MIN_K = 1024  # above this, first labels: nearest of max(256, k/32) seeds, then graph steps
EXACT_GRAPH_MAX_K = 8192  # up to here the centroids' first k-NN graph is exact (k^2 distances); above, faiss HNSW
HNSW_M, HNSW_EF = 32, 64  # assign(index="hnsw"): recall ~0.999 at d=4, k=50,000
TORCH_BLOCK = 1 << 24  # torch fallback: at most this many distances (64 MiB) at once
SPLIT_EPS = 1.0 / 1024  # faiss's relative perturbation when a big cluster is split to refill an empty one


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`. ``labels``/``inertia`` refer to the training points and the returned centroids."""

    centroids: Tensor  # (k, d) float32
    labels: Tensor  # (s,) int64: each training point's centroid (its nearest for >99% of points with "graph")
    sample: Tensor | None  # (s,) int64 sorted indices of the training points in ``points``; None: all, in order
    inertia: float  # MEAN squared distance of the training points to their labelled centroid
    objective: list[float] = field(default_factory=list)  # the inertia after each iteration
    iterations: int = 0  # iterations run (fewer than niter once no label changes)


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
    x = _as_points(points, "points")
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
    _check_choice("search", search, SEARCHES)
    _check_choice("init", init, INITS)
    if n <= k:  # nothing to cluster: every point is its own centroid
        centroids = torch.from_numpy(x[np.arange(k) % n].copy())
        return KMeansResult(centroids, torch.arange(n), None, 0.0)
    rng = np.random.default_rng(seed)
    sample = (
        np.sort(rng.choice(n, max_points_per_centroid * k, replace=False)) if n > max_points_per_centroid * k else None
    )
    s = x if sample is None else x[sample]
    c = _seeds(s, k, init, rng)
    with _Runner(threads) as run:
        c, labels, objective = _lloyd(s, c, niter, search, min(neighbors, k - 1) + 1, rng, run)
    return KMeansResult(
        torch.from_numpy(c),
        torch.from_numpy(labels),
        None if sample is None else torch.from_numpy(sample),
        objective[-1],
        objective[1:],
        len(objective) - 1,
    )


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
    x, c = _as_points(points, "points"), _as_points(centroids, "centroids")
    if x.shape[1] != c.shape[1] or len(c) == 0:
        raise ValueError(
            f"points are {x.shape[1]}-dimensional and centroids {tuple(c.shape)}; need (k >= 1, {x.shape[1]})"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_choice("index", index, INDEXES)
    labels, dist = _nearest(x, c, index, batch_size)
    return torch.from_numpy(labels), torch.from_numpy(dist)


# --- helpers --------------------------------------------------------------------------------------------------


def _as_points(points: Tensor | np.ndarray, name: str) -> np.ndarray:
    x = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (n, d) array, got shape {tuple(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():  # faiss would quietly produce garbage (or abort) on them
        raise ValueError(f"{name} hold non-finite values")
    return x


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; available: {', '.join(allowed)}")


def _nearest(x: np.ndarray, c: np.ndarray, index: str, batch_size: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
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
        searcher = _faiss_index(c, index)
        step = batch_size
        for start in range(0, len(x), step):
            labels[start : start + step] = searcher.search(x[start : start + step], 1)[1][:, 0]
    for start in range(0, len(x), step):
        # exact |x - c|^2, not |x|^2 - 2xc + |c|^2 (which cancels badly): the same value whatever the batch
        diff = x[start : start + step] - c[labels[start : start + step]]
        dist[start : start + step] = np.einsum("ij,ij->i", diff, diff)
    return labels, dist


def _faiss_index(c: np.ndarray, kind: str, hnsw_m: int = HNSW_M, hnsw_ef: int = HNSW_EF):
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


def _knn(c: np.ndarray, m: int) -> np.ndarray:
    """(k, m) int32: each centroid's m nearest centroids (itself usually first); exact up to EXACT_GRAPH_MAX_K."""
    if faiss is not None:
        # the first graph only seeds the refinement: a light HNSW (M=16) finds ~all true neighbours at d=4
        index = _faiss_index(c, "flat" if len(c) <= EXACT_GRAPH_MAX_K else "hnsw", 16, max(32, 2 * m))
        return index.search(c, m)[1].astype(np.int32)
    ct, out = torch.from_numpy(c), np.empty((len(c), m), np.int32)
    step = max(1, TORCH_BLOCK // len(c))
    for start in range(0, len(c), step):
        out[start : start + step] = torch.cdist(ct[start : start + step], ct).topk(m, largest=False).indices.numpy()
    return out


def _seeds(s: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """k initial centroids from the training points (see the module docstring)."""
    perm = rng.permutation(len(s))
    first = s[perm[:k]]
    pool = perm[k : 5 * k]
    if init == "random" or len(pool) < k:
        return first.copy()
    cell, dist = _nearest(s[pool], first, "flat")
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
    s: np.ndarray, c: np.ndarray, niter: int, search: str, width: int, rng: np.random.Generator, run: _Runner
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Lloyd's iterations from seeds ``c``: (centroids, labels, objective after the first labels and each iteration)."""
    k = len(c)
    if search == "graph":
        graph = run.refine(c, _knn(c, width))
        subset = (
            np.sort(rng.choice(k, max(COARSE_MIN_K // 4, k // 32), replace=False)) if k > COARSE_MIN_K else np.arange(k)
        )
        labels, dist = _nearest(s, c[subset], "flat")
        labels = subset[labels]
        for _ in range(10 if len(subset) < k else 0):  # greedy graph descent to the nearest seed
            if run.reassign(s, c, graph, labels, dist) <= len(s) // 1000:
                break
        # sorting the points by label makes each thread's centroid and graph reads nearly sequential (5x faster)
        order = np.argsort(labels, kind="stable")
        s, labels, dist = s[order], labels[order], dist[order]
    else:
        labels, dist = _nearest(s, c, search)
        graph, order = None, None
    objective = [float(dist.mean(dtype=np.float64))]
    for _ in range(niter):
        c, counts, spread = _update(s, labels, c)  # centroids = means of their points; empty ones split a big one
        split = _split_empty(c, counts, spread, rng, graph)
        if graph is not None:
            graph = run.refine(c, graph)  # centroids move little: their new neighbours are within two hops
            changed = run.reassign(s, c, graph, labels, dist)
        else:
            new_labels, dist = _nearest(s, c, search)
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
    _accumulate(s, labels, sums, squares, counts)  # one thread, one order: the same sums whatever the thread count
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


class _Runner:
    """Runs the compiled kernels over chunks of rows on a few threads (the kernels release the GIL)."""

    MIN_WORK = 1 << 20  # distances below which one thread is faster than waking others

    def __init__(self, threads: int | None) -> None:
        self.threads = max(1, threads or torch.get_num_threads())
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __enter__(self) -> _Runner:
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
        return self._map(len(s), len(s) * graph.shape[1], lambda a, b: _reassign(s, c, graph, labels, dist, a, b))

    def refine(self, c: np.ndarray, graph: np.ndarray) -> np.ndarray:
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
def _accumulate(x, labels, sums, squares, counts):
    for i in range(x.shape[0]):
        j = labels[i]
        counts[j] += 1
        for a in range(x.shape[1]):
            v = np.float64(x[i, a])
            sums[j, a] += v
            squares[j] += v * v


# --- on the points' own device (a GPU run's clustering) -----------------------------------------------------


def distance_block(device: torch.device) -> int:
    """How many point-centroid distances :func:`nearest_torch` computes at once on ``device``: :data:`TORCH_BLOCK` on
    the host; on a GPU an eighth of its free memory (at least TORCH_BLOCK), so a clustering's search is a few large
    matmuls instead of thousands of small ones (at k = 17k, TORCH_BLOCK is ~1k points per matmul)."""
    if device.type != "cuda":
        return TORCH_BLOCK
    free, _ = torch.cuda.mem_get_info(device)  # (the driver's count: no wait for the stream)
    return max(TORCH_BLOCK, free // 8 // 4)


def nearest_torch(points: Tensor, centroids: Tensor, block: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact nearest centroid of each point, in torch ops on the points' device: (labels int64, squared distances
    float32), at most ``block`` distances at a time (default: :func:`distance_block`). Distances are |x - c|^2
    computed exactly for the winner. Batched: ``points`` (B, n, d) against ``centroids`` (B, k, d), each batch
    entry against its own centroids (labels and distances (B, n))."""
    if points.dim() == 2:
        labels, distances = nearest_torch(points.unsqueeze(0), centroids.unsqueeze(0), block)
        return labels[0], distances[0]
    k = centroids.shape[1]
    c_sq = centroids.square().sum(2).unsqueeze(1)  # (B, 1, k)
    block = distance_block(points.device) if block is None else block
    step = max(1, block // (k * points.shape[0]))
    labels = torch.cat(
        [
            torch.baddbmm(c_sq, points[:, start : start + step], centroids.transpose(1, 2), alpha=-2).argmin(2)
            for start in range(0, points.shape[1], step)
        ],
        dim=1,
    )
    distances = (points - centroids.gather(1, labels.unsqueeze(-1).expand(-1, -1, points.shape[2]))).square().sum(2)
    return labels, distances


CONVERGENCE_CHECK = 10  # kmeans_torch reads whether an iteration changed anything (a host wait) this often


def _split_into_empty(centroids: Tensor, counts: Tensor, full: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """Each empty cluster takes half of one of the largest (faiss's split, deterministic: the i-th empty cluster
    the i-th largest, perturbed by the relative epsilon), in fixed shapes (no host wait); and whether any was.
    Batched: ``centroids`` (B, k, d), ``counts`` and ``full`` (B, k); whether any was per batch entry."""
    batch, k, d = centroids.shape
    empty = ~full
    rank = torch.cumsum(empty, 1) - 1  # each empty cluster's place among the empty ones
    donor = torch.argsort(counts, dim=1, descending=True, stable=True).gather(1, rank.clamp_min(0))
    taken = centroids.gather(1, donor.unsqueeze(-1).expand(-1, -1, d))
    delta = SPLIT_EPS * sign * (taken.abs() + 1e-12)
    split = torch.where(empty.unsqueeze(-1), taken + delta, centroids)
    # the donors keep the other half; a spare last row per entry takes the writes of clusters that were not empty
    padded = torch.cat([split, split[:, :1]], dim=1)
    target = torch.where(empty, donor, k)
    kept = padded.gather(1, target.unsqueeze(-1).expand(-1, -1, d))
    rows = (target + torch.arange(batch, device=target.device).unsqueeze(1) * (k + 1)).view(-1)
    padded.view(-1, d).index_copy_(0, rows, torch.where(empty.unsqueeze(-1), taken - delta, kept).view(-1, d))
    return padded[:, :k], empty.any(1)


def kmeans_torch(
    points: Tensor, k: int, *, niter: int = 50, max_points_per_centroid: int = 256, seed: int = 0
) -> KMeansResult:
    """Exact Lloyd's k-means in torch ops on ``points``' device: CCE's clustering where the tables live on a GPU
    (faiss-gpu is not installable everywhere; the graph search of :func:`kmeans` is a CPU kernel).

    The same sample rule and seeding as :func:`kmeans` (``max_points_per_centroid * k`` uniform points, k of them as
    the first centroids, a CPU generator seeded by ``seed``), every assignment exact; empty clusters are refilled by
    splitting the largest clusters (one each, perturbed by faiss's relative epsilon). Stops once no label changes
    (read every :data:`CONVERGENCE_CHECK` iterations: no host wait inside an iteration). Not bit-identical to
    :func:`kmeans` (another search and summation order). :func:`kmeans_torch_batched` runs several at once.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty 2-D (n, d) tensor, got shape {tuple(points.shape)}")
    return kmeans_torch_batched(
        points.unsqueeze(0), k, niter=niter, max_points_per_centroid=max_points_per_centroid, seeds=[seed]
    )[0]


def kmeans_torch_batched(
    points: Tensor, k: int, *, niter: int = 50, max_points_per_centroid: int = 256, seeds: Sequence[int] = (0,)
) -> list[KMeansResult]:
    """:func:`kmeans_torch` of each ``points[b]`` ((B, n, d): CCE's columns) with seed ``seeds[b]``, all in the same
    kernels: each iteration is a few launches for every entry, and convergence is read once for all of them. Each
    entry's result is what :func:`kmeans_torch` gives it alone (an entry that has converged while others have not
    changes no further: the same labels give the same centroids)."""
    if points.dim() != 3 or points.shape[1] == 0 or len(seeds) != points.shape[0]:
        raise ValueError(
            f"points must be a non-empty (B, n, d) tensor with a seed per entry, got shape "
            f"{tuple(points.shape)} and {len(seeds)} seeds"
        )
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points hold non-finite values")
    x = points.detach().float().contiguous()
    batch, n, device = x.shape[0], x.shape[1], x.device
    if n <= k:  # nothing to cluster: every point is its own centroid
        return [
            KMeansResult(x[b, torch.arange(k, device=device) % n].clone(), torch.arange(n, device=device), None, 0.0)
            for b in range(batch)
        ]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    samples: list[Tensor | None] = [None] * batch
    if n > max_points_per_centroid * k:
        samples = [
            torch.randperm(n, generator=g)[: max_points_per_centroid * k].sort().values.to(device) for g in generators
        ]
        x = torch.stack([x[b, sample] for b, sample in enumerate(samples)])
    m, d = x.shape[1], x.shape[2]
    firsts = torch.stack([torch.randperm(m, generator=g)[:k] for g in generators]).to(device)
    centroids = x.gather(1, firsts.unsqueeze(-1).expand(-1, -1, d)).clone()
    labels, distances = nearest_torch(x, centroids)
    # no host wait inside an iteration: the objective stays on the device, empty clusters are split in fixed
    # shapes, and convergence is read every CONVERGENCE_CHECK iterations (an iteration after convergence changes
    # nothing: the same labels give the same centroids), then trimmed to where each entry reached it
    objective = [distances.double().mean(1)]
    sign = torch.where(torch.arange(d, device=device) % 2 == 0, 1.0, -1.0)
    offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # each entry's clusters in the flat counts
    done_at = torch.full((batch,), niter, dtype=torch.int64, device=device)  # the first iteration changing nothing
    x64, iterations = x.double().reshape(-1, d), 0
    for iteration in range(1, niter + 1):
        iterations = iteration
        flat = (labels + offsets).view(-1)
        counts = (
            torch.zeros(batch * k, dtype=torch.int64, device=device)
            .index_add_(0, flat, torch.ones_like(flat))
            .view(batch, k)
        )
        sums = torch.zeros(batch * k, d, dtype=torch.float64, device=device).index_add_(0, flat, x64).view(batch, k, d)
        full = counts > 0
        centroids = torch.where(full.unsqueeze(-1), (sums / counts.clamp_min(1).unsqueeze(-1)).float(), centroids)
        centroids, had_empty = _split_into_empty(centroids, counts, full, sign)
        new_labels, distances = nearest_torch(x, centroids)
        objective.append(distances.double().mean(1))
        still = (new_labels != labels).any(1) | had_empty
        done_at = torch.where((done_at == niter) & ~still, iteration, done_at)
        labels = new_labels
        if iteration % CONVERGENCE_CHECK == 0 and not bool(still.any()):
            break
    values = torch.stack(objective, dim=1).tolist()  # (B, iterations + 1)
    results = []
    for b, ended in enumerate(done_at.tolist()):
        ran = min(iterations, ended)
        trimmed = values[b][: ran + 1]
        results.append(KMeansResult(centroids[b], labels[b], samples[b], trimmed[-1], trimmed[1:], ran))
    return results
