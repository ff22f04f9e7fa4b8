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

from compemb.cluster.device import CONVERGENCE_CHECK, distance_block, kmeans_torch, kmeans_torch_batched, nearest_torch
from compemb.cluster.host import COARSE_MIN_K, INITS, SEARCHES, kmeans
from compemb.cluster.search import EXACT_GRAPH_MAX_K, HNSW_EF, HNSW_M, INDEXES, assign
from compemb.cluster.shared import SPLIT_EPS, TORCH_BLOCK, KMeansResult

__all__ = [
    "COARSE_MIN_K",
    "CONVERGENCE_CHECK",
    "EXACT_GRAPH_MAX_K",
    "HNSW_EF",
    "HNSW_M",
    "INDEXES",
    "INITS",
    "SEARCHES",
    "SPLIT_EPS",
    "TORCH_BLOCK",
    "KMeansResult",
    "assign",
    "distance_block",
    "kmeans",
    "kmeans_torch",
    "kmeans_torch_batched",
    "nearest_torch",
]
