"""What the host and the device k-means of :mod:`compemb.cluster` share: their result, faiss's split of a big
cluster to refill an empty one, and the most distances a torch search computes at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

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
