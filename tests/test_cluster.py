"""compemb.cluster: assignment against brute force, k-means against a plain Lloyd's, determinism, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import compemb.cluster as cluster
import compemb.cluster.host as cluster_host
import compemb.cluster.kernels as cluster_kernels
import compemb.cluster.search as cluster_search
from compemb.cluster import KMeansResult, assign, kmeans


def blobs(n: int, centers: int, d: int = 4, spread: float = 0.05, seed: int = 0) -> np.ndarray:
    """Well-separated Gaussian blobs, float32."""
    rng = np.random.default_rng(seed)
    middle = rng.uniform(-5, 5, (centers, d))
    return (middle[rng.integers(centers, size=n)] + rng.normal(0, spread, (n, d))).astype(np.float32)


def lloyd(x: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """The reference: exact Lloyd's from k random points, float64; an empty cluster keeps its centroid."""
    x64 = torch.from_numpy(x).double()
    c = x64[np.random.default_rng(seed).choice(len(x), k, replace=False)]
    for _ in range(iterations):
        labels = torch.cdist(x64, c).argmin(1)
        counts = torch.bincount(labels, minlength=k).double()
        sums = torch.zeros_like(c).index_add_(0, labels, x64)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    return c.numpy()


def mean_sq(x: np.ndarray, c: np.ndarray) -> float:
    """Mean squared distance of x to its nearest row of c (float64 brute force)."""
    return float(torch.cdist(torch.from_numpy(x).double(), torch.as_tensor(c).double()).min(1).values.square().mean())


@pytest.fixture
def no_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_search, "faiss", None)


@pytest.fixture
def large_k_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the coarse-labels and HNSW-graph paths (meant for k > 1024, k > 8192) at test sizes."""
    monkeypatch.setattr(cluster_host, "COARSE_MIN_K", 16)
    monkeypatch.setattr(cluster_search, "EXACT_GRAPH_MAX_K", 16)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("d", [4, 7])
def test_assign_is_brute_force_argmin(backend: str, d: int, request: pytest.FixtureRequest) -> None:
    if backend == "torch":
        request.getfixturevalue("no_faiss")
    x = torch.randn(3001, d, generator=torch.Generator().manual_seed(1))
    c = torch.randn(97, d, generator=torch.Generator().manual_seed(2))
    labels, dist = assign(x, c, batch_size=256)  # 3001 = 11 full batches + 185: crosses batch boundaries
    brute = torch.cdist(x.double(), c.double())
    assert labels.dtype == torch.int64 and dist.dtype == torch.float32 and labels.shape == dist.shape == (3001,)
    two = brute.topk(2, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-4  # away from float32 near-ties the label is the argmin itself
    assert torch.equal(labels[clear], brute.argmin(1)[clear])
    torch.testing.assert_close(
        dist.double(), brute.gather(1, labels[:, None]).squeeze(1).square(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(dist.double(), two[:, 0].square(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_assign_batches_give_identical_results(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "torch":
        request.getfixturevalue("no_faiss")
    x, c = blobs(5000, 40, spread=0.5), blobs(64, 40, seed=1)
    labels, dist = assign(x, c, batch_size=len(x))
    for batch_size in (20, 333, 4096):
        other = assign(x, c, batch_size=batch_size)
        assert torch.equal(other[0], labels) and torch.equal(other[1], dist)


def test_assign_hnsw_is_close_to_exact() -> None:
    x, c = blobs(4000, 30, spread=0.5), blobs(500, 30, spread=0.5, seed=1)
    exact = assign(x, c)
    approx = assign(x, c, index="hnsw")
    assert (approx[0] == exact[0]).float().mean() > 0.98
    assert approx[1].double().mean() <= exact[1].double().mean() * 1.01


def test_kmeans_is_close_to_lloyd_and_beats_random_centroids() -> None:
    x = blobs(6000, 16, spread=0.5)  # 16 separated blobs, 4 centroids each: local optima differ by a few %
    reference = np.mean([mean_sq(x, lloyd(x, 64, 50, seed)) for seed in range(3)])
    random_centroids = mean_sq(x, x[np.random.default_rng(1).choice(len(x), 64, replace=False)])
    objectives = {}
    for search in ("graph", "flat"):
        objectives[search] = [
            mean_sq(x, kmeans(x, 64, seed=seed, search=search).centroids.numpy()) for seed in range(3)
        ]
        assert np.mean(objectives[search]) <= reference * 1.05, search
        assert np.mean(objectives[search]) < random_centroids * 0.8, search
    # HNSW over 64 centroids finds the nearest: the same optimum as exact search from the same seeds
    with_hnsw = mean_sq(x, kmeans(x, 64, seed=0, search="hnsw").centroids.numpy())
    assert with_hnsw == pytest.approx(objectives["flat"][0], rel=0.01)


def test_inertia_is_the_mean_squared_distance_of_the_training_points(large_k_paths: None) -> None:
    x = blobs(20000, 50, spread=0.5)
    result = kmeans(x, 100, max_points_per_centroid=64, seed=3)  # 6,400 of the 20,000 points
    assert isinstance(result, KMeansResult) and result.sample is not None
    sample = result.sample.numpy()
    assert len(sample) == 6400 == len(np.unique(sample)) and (np.diff(sample) > 0).all()
    c = result.centroids.numpy().astype(np.float64)
    recomputed = float(((x[sample] - c[result.labels.numpy()]) ** 2).sum(1).mean())
    assert result.inertia == pytest.approx(recomputed, rel=1e-5)  # the mean, not the sum
    assert result.objective[-1] == result.inertia and len(result.objective) == result.iterations
    assert result.inertia == pytest.approx(mean_sq(x[sample], c), rel=0.01)  # labels: (nearly) the nearest
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.objective, result.objective[1:]))  # Lloyd never goes up


def test_kmeans_is_deterministic_whatever_the_threads(large_k_paths: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    monkeypatch.setattr(cluster_kernels.Runner, "MIN_WORK", 0)  # use the thread pool even at this size
    x = torch.from_numpy(blobs(8000, 30, spread=0.6))
    first = kmeans(x, 200, seed=5, threads=2)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        again = kmeans(x, 200, seed=5, threads=1)
    finally:
        faiss.omp_set_num_threads(threads)
    assert torch.equal(first.centroids, again.centroids) and torch.equal(first.labels, again.labels)
    assert first.objective == again.objective
    assert not torch.equal(kmeans(x, 200, seed=6).centroids, first.centroids)


def test_fewer_points_than_centroids() -> None:
    x = torch.randn(5, 4)
    result = kmeans(x, 8)
    assert torch.equal(result.centroids, x[torch.arange(8) % 5])  # the points, then copies: no NaN
    assert result.inertia == 0.0 and torch.equal(result.labels, torch.arange(5)) and result.iterations == 0
    assert torch.equal(kmeans(x, 5).centroids, x)
    labels, dist = assign(x, result.centroids)
    assert torch.equal(labels, torch.arange(5)) and float(dist.max()) == 0.0


def test_duplicate_points_split_empty_clusters_without_nan() -> None:
    # CCE's sub-vectors repeat: right after a clustering every id in a row has the same vector
    values = blobs(20, 20, spread=1.0)
    x = values[np.random.default_rng(0).integers(20, size=3000)]
    for search in cluster.SEARCHES:
        result = kmeans(x, 50, seed=0, search=search)
        assert torch.isfinite(result.centroids).all(), search
        assert result.inertia == pytest.approx(0.0, abs=1e-8), search  # every distinct value got a centroid


def test_torch_fallback_matches_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    x = blobs(5000, 30, spread=0.4)
    with_faiss = kmeans(x, 64, seed=0)
    monkeypatch.setattr(cluster_search, "faiss", None)
    with_torch = kmeans(x, 64, seed=0)
    assert with_torch.inertia == pytest.approx(with_faiss.inertia, rel=0.01)
    with pytest.raises(ValueError, match="needs faiss"):
        assign(x, with_torch.centroids, index="hnsw")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kmeans(torch.randn(10), 2), "2-D"),
        (lambda: kmeans(torch.randn(10, 4), 0), "k must be"),
        (lambda: kmeans(torch.randn(10, 4), 2, search="exact"), "unknown search 'exact'; available: graph, flat, hnsw"),
        (lambda: kmeans(torch.randn(10, 4), 2, init="kmeans++"), "unknown init"),
        (lambda: kmeans(torch.full((10, 4), float("nan")), 2), "non-finite"),
        (lambda: kmeans(torch.randn(10, 4), 2, niter=-1), "niter"),
        (lambda: assign(torch.randn(10, 4), torch.randn(3, 5)), "4-dimensional"),
        (lambda: assign(torch.randn(10, 4), torch.randn(3, 4), batch_size=0), "batch_size"),
        (lambda: assign(torch.randn(10, 4), torch.randn(3, 4), index="ivf"), "unknown index 'ivf'"),
    ],
)
def test_errors_name_the_bad_value(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_kmeans_on_the_points_device_is_exact_lloyd_and_as_good_as_the_host_kmeans() -> None:
    """kmeans_torch (a GPU run's clustering): every label the exact nearest centroid, an objective within 5% of the
    host k-means on a Gaussian mixture, seeded."""
    from compemb.cluster import kmeans_torch, nearest_torch

    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(40, 4, generator=generator) * 4
    points = centres[torch.randint(0, 40, (20_000,), generator=generator)] + torch.randn(20_000, 4, generator=generator)
    on_device = kmeans_torch(points, 64, niter=30, seed=1)
    host = kmeans(points, 64, niter=30, seed=1)
    labels, distances = nearest_torch(points, on_device.centroids)
    brute = torch.cdist(points.double(), on_device.centroids.double()).argmin(1)
    assert (labels == brute).float().mean() > 0.999  # ties aside
    assert float(distances.double().mean()) <= 1.05 * float(assign(points, host.centroids)[1].double().mean())
    again = kmeans_torch(points, 64, niter=30, seed=1)
    assert torch.equal(again.centroids, on_device.centroids)
    assert on_device.objective == sorted(on_device.objective, reverse=True)  # Lloyd's never raises it


def _lloyd_reference(points: torch.Tensor, k: int, niter: int, seed: int):
    """kmeans_torch's algorithm written plainly, one host read per decision (the form it had before issue 37)."""
    from compemb.cluster import SPLIT_EPS, nearest_torch

    generator = torch.Generator().manual_seed(seed)
    x = points.float()
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    labels, distances = nearest_torch(x, centroids)
    objective, iterations = [float(distances.double().mean())], 0
    for _ in range(niter):
        iterations += 1
        counts = torch.zeros(k, dtype=torch.int64).index_add_(0, labels, torch.ones_like(labels))
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x.double())
        full = counts > 0
        centroids = torch.where(full.unsqueeze(1), (sums / counts.clamp_min(1).unsqueeze(1)).float(), centroids)
        empty = (~full).nonzero().squeeze(1)
        if empty.numel():
            donors = torch.argsort(counts, descending=True, stable=True)[: empty.numel()]
            sign = torch.where(torch.arange(x.shape[1]) % 2 == 0, 1.0, -1.0)
            delta = SPLIT_EPS * sign * (centroids[donors].abs() + 1e-12)
            centroids[empty], centroids[donors] = centroids[donors] + delta, centroids[donors] - delta
        new_labels, distances = nearest_torch(x, centroids)
        objective.append(float(distances.double().mean()))
        changed = bool((new_labels != labels).any())
        labels = new_labels
        if not changed and not empty.numel():
            break
    return centroids, labels, objective[1:], iterations


@pytest.mark.parametrize("n, k, duplicates", [(3_000, 40, False), (600, 150, True), (2_000, 64, False)])
def test_kmeans_on_the_device_path_equals_plain_lloyd_without_a_host_wait_per_iteration(n, k, duplicates) -> None:
    """kmeans_torch keeps its decisions on the device (empty clusters split in fixed shapes, convergence read every
    CONVERGENCE_CHECK iterations): the same centroids, labels, objective and iteration count as plain Lloyd with a
    host read per decision, and host waits that grow with niter / CONVERGENCE_CHECK only."""
    from compemb.bench.syncs import SyncCounter
    from compemb.cluster import CONVERGENCE_CHECK, kmeans_torch

    generator = torch.Generator().manual_seed(n + k)
    points = torch.randn(n, 4, generator=generator)
    if duplicates:  # many identical points: clusters go empty and are split
        points = points[torch.randint(0, 60, (n,), generator=generator)]
    result = kmeans_torch(points, k, niter=40, seed=5, max_points_per_centroid=10_000)
    centroids, labels, objective, iterations = _lloyd_reference(points, k, 40, seed=5)
    assert torch.equal(result.centroids, centroids) and torch.equal(result.labels, labels)
    assert result.objective == objective and result.iterations == iterations
    waits = {}
    for niter in (10, 40):
        with SyncCounter() as counter:
            kmeans_torch(points, k, niter=niter, seed=5, max_points_per_centroid=10_000)
        waits[niter] = counter.total
    assert waits[40] - waits[10] <= 30 // CONVERGENCE_CHECK, waits


def test_kmeans_of_several_columns_at_once_gives_each_column_its_own_result() -> None:
    """kmeans_torch_batched (CCE's columns clustered together on a device): each entry exactly what kmeans_torch
    gives it alone (sample, centroids, labels, objective, iterations), though the entries converge at different
    iterations and one splits empty clusters; host waits those of one clustering, not one per entry."""
    from compemb.bench.syncs import SyncCounter
    from compemb.cluster import kmeans_torch, kmeans_torch_batched

    generator = torch.Generator().manual_seed(11)
    points = torch.randn(4, 3_000, 4, generator=generator)
    points[1] = points[1, torch.randint(0, 50, (3_000,), generator=generator)]  # duplicates: empty clusters split
    points[2] = torch.from_numpy(blobs(3_000, 8, seed=2))  # well separated: converges early
    seeds = [5, 6, 7, 8]
    with SyncCounter() as together:
        results = kmeans_torch_batched(points, 40, niter=40, seeds=seeds, max_points_per_centroid=50)
    waits_alone = []
    for b, result in enumerate(results):
        with SyncCounter() as counter:
            alone = kmeans_torch(points[b], 40, niter=40, seed=seeds[b], max_points_per_centroid=50)
        waits_alone.append(counter.total)
        assert torch.equal(result.sample, alone.sample) and torch.equal(result.centroids, alone.centroids)
        assert torch.equal(result.labels, alone.labels)
        assert result.objective == alone.objective and result.iterations == alone.iterations
    assert len({result.iterations for result in results}) > 1
    assert together.total <= max(waits_alone) + 1 < sum(waits_alone)
