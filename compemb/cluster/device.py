"""k-means in torch ops on the points' own device (a GPU run's clustering for CCE): exact Lloyd's, several
problems batched in the same kernels, no host wait inside an iteration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compemb.cluster.shared import SPLIT_EPS, TORCH_BLOCK, KMeansResult


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
