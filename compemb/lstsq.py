"""CCE for least squares: dense CCE (Algorithm 1), sparse CCE (Algorithm 2), hashing, and the Theorem 3.1 bound.

Tsang & Ahle, "Clustering the Sketch: Dynamic Compression for Embedding Tables", NeurIPS 2023, arXiv 2210.05974, §3.
We want ``T`` (d1 x d2) minimising ``||X T - Y||_F^2`` with ``T = H M`` held in little memory: a sketch ``H`` and a
small ``M``. Deviations from the paper: none in the algorithms. The paper's script draws ``Y`` as pure noise;
:meth:`LeastSquaresProblem.generate` plants a ``T_true`` as well (``signal=0`` gives the paper's problem). Every
loss list starts at iteration 0 = ``T = 0`` (before any solve), as the paper's script and the bound do.
All arithmetic is float64; k-means runs on float32 copies of ``T``'s rows (only its assignment is used).

Example::

    >>> import math
    >>> problem = LeastSquaresProblem.generate(n=200, d1=40, d2=3, seed=0)
    >>> losses = dense_cce(problem, k=4, iterations=5, seed=0)
    >>> len(losses), math.isclose(losses[0], theorem_bound(problem, k=4, iterations=0)[0])  # both start at T = 0
    (6, True)
    >>> all(b <= a for a, b in zip(losses, losses[1:]))  # T is a column block of the next H
    True
"""

from __future__ import annotations

import datetime
import io
import json
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from compemb.io import atomic_write_bytes, atomic_write_text
from compemb.outputs import check_output_file, png_metadata

METHODS = ("dense_cce", "sparse_cce", "hashing", "bound")
LABELS = {
    "dense_cce": "dense CCE",
    "sparse_cce": "sparse CCE",
    "hashing": "hashing (2k buckets)",
    "bound": "Theorem 3.1 bound",
}


@dataclass(frozen=True, eq=False)
class LeastSquaresProblem:
    """A least-squares problem ``min_T ||X T - Y||_F^2`` in float64.

    Args:
        X: the (n, d1) design matrix.
        Y: the (n, d2) targets.
    """

    X: Tensor
    Y: Tensor

    def __post_init__(self) -> None:
        if self.X.dim() != 2 or self.Y.dim() != 2 or self.X.shape[0] != self.Y.shape[0]:
            raise ValueError(
                f"X must be (n, d1) and Y (n, d2) with the same n; got {tuple(self.X.shape)} and {tuple(self.Y.shape)}"
            )
        # float64 throughout: the excess losses we report fall far below the losses they are differences of
        object.__setattr__(self, "X", self.X.to(torch.float64))
        object.__setattr__(self, "Y", self.Y.to(torch.float64))

    @classmethod
    def generate(
        cls, n: int, d1: int, d2: int, seed: int = 0, *, signal: float = 1.0, noise: float = 1.0
    ) -> LeastSquaresProblem:
        """A seeded problem: ``X`` standard Gaussian, ``Y = X T_true + noise * E``.

        ``T_true`` has i.i.d. N(0, signal^2 / d1) entries, so every entry of ``X T_true`` has variance
        ``signal^2``; ``E`` is standard Gaussian. ``signal=0`` is the paper's problem (``Y`` pure noise).
        """
        for name, value in (("n", n), ("d1", d1), ("d2", d2)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if signal < 0 or noise < 0:
            raise ValueError(f"signal and noise must be >= 0, got signal={signal}, noise={noise}")
        generator = torch.Generator().manual_seed(seed)
        X = torch.randn(n, d1, generator=generator, dtype=torch.float64)
        T_true = torch.randn(d1, d2, generator=generator, dtype=torch.float64) * (signal / d1**0.5)
        Y = X @ T_true + noise * torch.randn(n, d2, generator=generator, dtype=torch.float64)
        return cls(X, Y)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n, d1, d2)``."""
        return self.X.shape[0], self.X.shape[1], self.Y.shape[1]

    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        # one thin SVD gives both T* (minimum norm) and sigma_min(X); X is the largest matrix here
        return torch.linalg.svd(self.X, full_matrices=False)

    @cached_property
    def solution(self) -> Tensor:
        """The unconstrained optimum ``T* = argmin_T ||X T - Y||_F`` (the minimum-norm one if X is rank-deficient)."""
        U, S, Vh = self._svd
        keep = S > S.max() * max(self.X.shape) * torch.finfo(S.dtype).eps
        return Vh[keep].T @ ((U[:, keep].T @ self.Y) / S[keep, None])

    @cached_property
    def rho(self) -> float:
        """``sigma_min(X)^2 / ||X||_F^2`` (0 when X has fewer rows than columns)."""
        n, d1, _ = self.shape
        sigma_min = float(self._svd[1].min()) if n >= d1 else 0.0
        return sigma_min**2 / float(self.X.square().sum())

    def loss(self, T: Tensor) -> float:
        """``||X T - Y||_F^2``."""
        return float((self.X @ T - self.Y).square().sum())


def optimum(problem: LeastSquaresProblem) -> float:
    """The optimum loss ``||X T* - Y||_F^2`` with ``T*`` unconstrained."""
    return problem.loss(problem.solution)


def theorem_bound(problem: LeastSquaresProblem, k: int, iterations: int) -> list[float]:
    """Theorem 3.1 for i = 0..iterations: ``(1 - rho)^(i k) ||X T*||^2 + ||X T* - Y||^2``.

    It bounds dense CCE's *expected* loss; at i = 0 it equals ``||Y||^2``, the loss of ``T = 0``.
    """
    _check(problem, k, iterations)
    fit = float((problem.X @ problem.solution).square().sum())
    best = optimum(problem)
    return [(1.0 - problem.rho) ** (i * k) * fit + best for i in range(iterations + 1)]


def dense_cce(problem: LeastSquaresProblem, k: int, iterations: int, seed: int = 0) -> list[float]:
    """Algorithm 1: ``H = [T | N]``, N Gaussian (d1 x k); ``M = argmin ||X H M - Y||``; ``T = H M``.

    Returns ``||X T_i - Y||_F^2`` for i = 0..iterations, where ``T_0 = 0`` and ``T_i`` follows the i-th solve.
    H has d2 + k columns, so ``T_{i-1} = H [I; 0]`` is always reachable and the loss never goes up.
    """
    _check(problem, k, iterations)
    (_, d1, d2), X = problem.shape, problem.X
    generator = torch.Generator().manual_seed(seed)
    T = X.new_zeros(d1, d2)
    losses = [problem.loss(T)]
    for _ in range(iterations):
        H = torch.cat([T, torch.randn(d1, k, generator=generator, dtype=X.dtype)], dim=1)
        T = H @ _least_squares(X @ H, problem.Y)
        losses.append(problem.loss(T))
    return losses


def sparse_cce(
    problem: LeastSquaresProblem, k: int, iterations: int, seed: int = 0, kmeans_iterations: int = 50
) -> list[float]:
    """Algorithm 2: ``H = [one-hot k-means clusters of T's rows | one-hot random hash]``, each into k columns.

    Returns ``||X T_i - Y||_F^2`` for i = 0..iterations (``T_0 = 0``). At the first solve T = 0 has nothing to
    cluster, so the first block is a random one-hot too. ``T = H M`` stores 2k x d2 floats and two pointers per row.
    Clustering only approximates T, so unlike dense CCE the loss can go up between iterations.
    """
    _check(problem, k, iterations)
    if k > problem.shape[1]:
        raise ValueError(f"sparse CCE clusters d1={problem.shape[1]} rows into k={k} clusters; k must be <= d1")
    (_, d1, d2), X = problem.shape, problem.X
    generator = torch.Generator().manual_seed(seed)
    T = X.new_zeros(d1, d2)
    losses = [problem.loss(T)]
    for i in range(iterations):
        clusters = _random_buckets(d1, k, generator) if i == 0 else _kmeans(T, k, seed + i, kmeans_iterations)
        buckets = _random_buckets(d1, k, generator)
        # X H for one-hot H sums X's columns per bucket: O(n d1), no dense H
        M = _least_squares(torch.cat([_sum_columns(X, clusters, k), _sum_columns(X, buckets, k)], dim=1), problem.Y)
        T = M[:k][clusters] + M[k:][buckets]
        losses.append(problem.loss(T))
    return losses


def hashing_baseline(problem: LeastSquaresProblem, k: int, iterations: int, seed: int = 0) -> list[float]:
    """The hashing trick at CCE's memory: each row of T is one of 2k rows of M, by a fixed random hash.

    It solves once and does not iterate; the same loss is returned for i = 0..iterations so it lines up with
    the CCE lists in a table.
    """
    _check(problem, k, iterations)
    (_, d1, _), X = problem.shape, problem.X
    buckets = _random_buckets(d1, 2 * k, torch.Generator().manual_seed(seed))
    M = _least_squares(_sum_columns(X, buckets, 2 * k), problem.Y)
    return [problem.loss(M[buckets])] * (iterations + 1)


def run_lstsq(
    n: int = 10_000,
    d1: int = 1_000,
    k: int = 100,
    d2: int = 10,
    iterations: int = 40,
    seed: int = 0,
    *,
    signal: float = 1.0,
    noise: float = 1.0,
    out: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run every method on one generated problem; return the losses, excess losses and the bound check.

    ``excess = loss - optimum loss``. With ``out``, also writes ``out.md``, ``out.json`` and ``out.png``; files
    there that compemb did not write (its PNG is signed) are replaced only with ``overwrite`` (checked first).
    """
    if out is not None:
        for suffix, kind in ((".md", "text"), (".json", "text"), (".png", "png")):
            check_output_file(f"{out}{suffix}", kind, overwrite=overwrite)
    problem = LeastSquaresProblem.generate(n, d1, d2, seed, signal=signal, noise=noise)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    best = optimum(problem)
    seconds["optimum"] = time.perf_counter() - start
    losses: dict[str, list[float]] = {}
    runners = {
        "dense_cce": lambda: dense_cce(problem, k, iterations, seed),
        "sparse_cce": lambda: sparse_cce(problem, k, iterations, seed),
        "hashing": lambda: hashing_baseline(problem, k, iterations, seed),
        "bound": lambda: theorem_bound(problem, k, iterations),
    }
    for name, runner in runners.items():
        start = time.perf_counter()
        losses[name] = runner()
        seconds[name] = time.perf_counter() - start
    excess = {name: [loss - best for loss in values] for name, values in losses.items()}
    # the bound is on an expectation; we check the one seeded run, with a rounding allowance
    slack = 1e-9 * losses["bound"][0]
    above = [i for i, (a, b) in enumerate(zip(losses["dense_cce"], losses["bound"])) if a > b + slack]
    result = {
        "settings": {
            "n": n,
            "d1": d1,
            "k": k,
            "d2": d2,
            "iterations": iterations,
            "seed": seed,
            "signal": signal,
            "noise": noise,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
        },
        "rho": problem.rho,
        "fit": losses["bound"][0] - best,
        "optimum": best,
        "losses": losses,
        "excess": excess,
        "bound_respected": not above,
        "iterations_above_bound": above,
        "dense_reduction": excess["dense_cce"][0] / excess["dense_cce"][-1] if excess["dense_cce"][-1] > 0 else None,
        "seconds": seconds,
    }
    if out is not None:
        write_lstsq(result, out)
    return result


def lstsq_table(result: dict) -> str:
    """The markdown table of excess losses per iteration (and a line on the settings and the bound)."""
    s, excess = result["settings"], result["excess"]
    lines = [
        f"Least squares n={s['n']:,}, d1={s['d1']:,}, d2={s['d2']}, k={s['k']}, seed {s['seed']}, "
        f"signal {s['signal']:g}, noise {s['noise']:g}: optimum loss {result['optimum']:,.1f}, "
        f"||X T*||^2 = {result['fit']:,.1f}, rho = {result['rho']:.3e}. Excess = loss - optimum loss; "
        f"iteration 0 is T = 0. torch {s['torch']}, {s['threads']} threads, {s['date']}; "
        f"{result['seconds']['dense_cce']:.1f} s for dense CCE.",
        "",
        f"Reproduce: `compemb lstsq --n {s['n']} --d1 {s['d1']} --k {s['k']} --d2 {s['d2']} --iterations "
        f"{s['iterations']} --seed {s['seed']} --signal {s['signal']:g} --noise {s['noise']:g}`",
        "",
        "| iteration | " + " | ".join(LABELS[name] for name in METHODS) + " |",
        "|---:|" + "---:|" * len(METHODS),
    ]
    for i in range(s["iterations"] + 1):
        lines.append(f"| {i} | " + " | ".join(f"{excess[name][i]:,.1f}" for name in METHODS) + " |")
    verdict = (
        "under the bound at every iteration"
        if result["bound_respected"]
        else f"ABOVE the bound at iterations {result['iterations_above_bound']}"
    )
    reduction = result["dense_reduction"]
    lines += [
        "",
        f"Dense CCE: excess {excess['dense_cce'][0]:,.1f} -> {excess['dense_cce'][-1]:,.1f} "
        + (f"({reduction:,.1f}x lower) " if reduction is not None else "")
        + f"in {s['iterations']} iterations, {verdict}.",
    ]
    return "\n".join(lines)


def write_lstsq(result: dict, stem: str) -> None:
    """Write ``stem.md`` (the table), ``stem.json`` (every figure) and ``stem.png`` (log-scale plot), atomically."""
    atomic_write_text(f"{stem}.md", lstsq_table(result) + "\n")
    atomic_write_text(f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_bytes(f"{stem}.png", _plot(result))


def _plot(result: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    s = result["settings"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    iterations = range(s["iterations"] + 1)
    styles = {"dense_cce": "-o", "sparse_cce": "-s", "hashing": "--", "bound": ":"}
    for name in METHODS:
        # a log axis cannot show 0; an excess at rounding level is drawn at the floor instead
        values = np.maximum(result["excess"][name], 1e-12 * result["fit"])
        axes.plot(iterations, values, styles[name], markersize=3, label=LABELS[name])
    axes.set_yscale("log")
    axes.set_xlabel("iteration i")
    axes.set_ylabel(r"excess loss $\|XT_i - Y\|_F^2 - \|XT^* - Y\|_F^2$")
    axes.set_title(
        f"CCE for least squares: n={s['n']:,}, d1={s['d1']:,}, d2={s['d2']}, k={s['k']}, rho={result['rho']:.2e}",
        fontsize=10,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, metadata=png_metadata())
    plt.close(figure)
    return buffer.getvalue()


def _check(problem: LeastSquaresProblem, k: int, iterations: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")


def _least_squares(A: Tensor, B: Tensor) -> Tensor:
    # gelsd (SVD) handles the rank-deficient A of the first solve (T = 0 columns) and empty buckets
    return torch.linalg.lstsq(A, B, driver="gelsd").solution


def _random_buckets(rows: int, buckets: int, generator: torch.Generator) -> Tensor:
    return torch.randint(buckets, (rows,), generator=generator)


def _sum_columns(X: Tensor, buckets: Tensor, count: int) -> Tensor:
    return X.new_zeros(X.shape[0], count).index_add_(1, buckets, X)


def _kmeans(T: Tensor, k: int, seed: int, iterations: int) -> Tensor:
    import faiss

    points = np.ascontiguousarray(T.numpy(), dtype=np.float32)
    # min_points_per_centroid=1: d1 rows into k clusters is the point here, not a sampling problem to warn about
    kmeans = faiss.Kmeans(
        points.shape[1],
        k,
        niter=iterations,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
        verbose=False,
    )
    kmeans.train(points)
    _, assignment = kmeans.index.search(points, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64))
