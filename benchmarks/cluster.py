"""CCE's clustering step (k-means + assignment of every ID) at d=4; writes benchmarks/results/cluster.{md,json}.

For each data set (a 64-Gaussian mixture with 5% uniform noise, and uniform points in [0, 1)^4, both float32) it
times :func:`compemb.cluster.kmeans` with the settings CCE passes (``niter=50``, ``max_points_per_centroid=256``,
every other knob at its default) and :func:`compemb.cluster.assign` of every point, and reports the k-means
objective: the mean squared distance of ALL points to their assigned centroid. The reference is exact Lloyd's:
``faiss.Kmeans(niter=50)`` on all points with a flat index (faiss's default uniform seeds), assigned exactly.

At 10M points and k=50,000 that reference would take 50 x ~24 s here, so it is run on a uniform 2M-point subsample
of the same data with k=10,000 (the same 200 points per centroid), next to ``kmeans`` with the same settings on
that subsample. The "levers" section runs alternatives at 1M / k=5,000 against the same reference.

    python benchmarks/cluster.py [--quick] [--no-levers] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numba
import numpy as np
import torch

from compemb.cluster import assign, kmeans
from compemb.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"
TARGET_SECONDS = {1_000_000: 10.0, 10_000_000: 120.0}  # from the issue: k-means + assignment of every ID
TARGET_RATIO = 1.02  # objective within 2% of exact Lloyd's
# measured elsewhere on this machine with the original CCE code (faiss niter=50, max_points_per_centroid=256, then a
# dense distance matrix for the assignment); quoted for context, not measured in this run
ORIGINAL = [
    {"n": 1_000_000, "k": 5_000, "kmeans_s": 69.0, "assign_s": 39.0, "total_s": 108.0},
    {"n": 10_000_000, "k": 50_000, "kmeans_s": None, "assign_s": None, "total_s": 2.5 * 3600},
]


def mixture(n: int, seed: int, d: int = 4, components: int = 64) -> np.ndarray:
    """n points from 64 Gaussians (random centres, scales and weights) plus 5% uniform noise, float32."""
    rng = np.random.default_rng(seed)
    centres, scales = rng.normal(0, 3, (components, d)), rng.uniform(0.2, 1.0, components)
    which = rng.choice(components, n, p=rng.dirichlet(np.ones(components)))
    x = (centres[which] + rng.normal(0, 1, (n, d)) * scales[which, None]).astype(np.float32)
    noise = n // 20
    x[:noise] = rng.uniform(x.min(0), x.max(0), (noise, d))
    return x


def uniform(n: int, seed: int, d: int = 4) -> np.ndarray:
    """n points uniform in [0, 1)^d, float32."""
    return np.random.default_rng(seed).random((n, d), dtype=np.float32)


def ours(x: np.ndarray, k: int, seed: int, compare_indexes: bool = False, **options: object) -> dict:
    """compemb.cluster: k-means then exact assignment of every point."""
    options = {"niter": 50, "max_points_per_centroid": 256, **options}  # CCE's settings unless a lever changes them
    start = time.perf_counter()
    result = kmeans(x, k, seed=seed, **options)  # type: ignore[arg-type]
    middle = time.perf_counter()
    labels, dist = assign(x, result.centroids)
    end = time.perf_counter()
    out = {
        "kmeans_s": middle - start,
        "assign_s": end - middle,
        "total_s": end - start,
        "objective": float(dist.double().mean()),
        "iterations": result.iterations,
    }
    if compare_indexes:  # the final assignment through HNSW instead, on every tenth point
        part = x[::10]
        began = time.perf_counter()
        hnsw_labels, hnsw_dist = assign(part, result.centroids, index="hnsw")
        out["hnsw_assign"] = {
            "points": len(part),
            "seconds": time.perf_counter() - began,
            "flat_seconds_prorated": out["assign_s"] * len(part) / len(x),
            "same_label": float((hnsw_labels == labels[::10]).double().mean()),
            "objective_ratio": float(hnsw_dist.double().mean() / dist[::10].double().mean()),
        }
    return out


def faiss_kmeans(x: np.ndarray, k: int, seed: int, niter: int = 50, points_per_centroid: int = 1 << 30) -> dict:
    """faiss.Kmeans (flat index, uniform seeds); all points by default: exact Lloyd's, the reference."""
    start = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, max_points_per_centroid=points_per_centroid, seed=seed + 1)
    km.train(x)
    middle = time.perf_counter()
    _, dist = assign(x, km.centroids)
    end = time.perf_counter()
    return {
        "kmeans_s": middle - start,
        "assign_s": end - middle,
        "total_s": end - start,
        "objective": float(dist.double().mean()),
        "iterations": niter,
    }


def run(quick: bool, levers: bool, seed: int) -> dict:
    """Every measurement, with the settings and machine."""
    scale = 10 if quick else 1
    kmeans(mixture(5000, 0), 64)  # load the compiled kernels before timing
    rows, lever_rows = [], []
    for name, make in (("mixture", mixture), ("uniform", uniform)):
        small = make(1_000_000 // scale, seed)
        reference = faiss_kmeans(small, 5_000 // scale, seed)
        rows.append(
            {
                "case": name,
                "n": len(small),
                "k": 5_000 // scale,
                "compared_on": "same data",
                **ours(small, 5_000 // scale, seed),
                "reference": reference,
            }
        )
        print(rows[-1], flush=True)
        if levers:  # each alternative on the same 1M points, against the same reference
            variants = {
                "neighbors=24": lambda small=small: ours(small, 5_000 // scale, seed, neighbors=24),
                "init=density": lambda small=small: ours(small, 5_000 // scale, seed, init="density"),
                "max_points_per_centroid=64": lambda small=small: ours(
                    small, 5_000 // scale, seed, max_points_per_centroid=64
                ),
                "search=flat (exact Lloyd's)": lambda small=small: ours(small, 5_000 // scale, seed, search="flat"),
                "faiss.Kmeans niter=20, 32 points/centroid": lambda small=small: faiss_kmeans(
                    small, 5_000 // scale, seed, 20, 32
                ),
                "faiss.Kmeans niter=25, 64 points/centroid": lambda small=small: faiss_kmeans(
                    small, 5_000 // scale, seed, 25, 64
                ),
            }
            for label, variant in variants.items():
                lever_rows.append({"case": name, "variant": label, **variant(), "reference": reference["objective"]})
                print(lever_rows[-1], flush=True)
        del small
        big = make(10_000_000 // scale, seed)
        rows.append(
            {
                "case": name,
                "n": len(big),
                "k": 50_000 // scale,
                "compared_on": "2M subsample below",
                **ours(big, 50_000 // scale, seed, compare_indexes=True),
                "reference": None,
            }
        )
        print(rows[-1], flush=True)
        sub = big[np.sort(np.random.default_rng(seed).choice(len(big), 2_000_000 // scale, replace=False))]
        del big
        rows.append(
            {
                "case": f"{name}, 2M subsample of the 10M",
                "n": len(sub),
                "k": 10_000 // scale,
                "compared_on": "same data",
                **ours(sub, 10_000 // scale, seed),
                "reference": faiss_kmeans(sub, 10_000 // scale, seed),
            }
        )
        print(rows[-1], flush=True)
        del sub
    return {
        "rows": rows,
        "levers": lever_rows,
        "original_code_measured_elsewhere": ORIGINAL,
        "targets": {"seconds": {str(n): s for n, s in TARGET_SECONDS.items()}, "objective_ratio": TARGET_RATIO},
        "settings": {
            "quick": quick,
            "seed": seed,
            "d": 4,
            "niter": 50,
            "max_points_per_centroid": 256,
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "numba": numba.__version__,
            "threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "cpus": os.cpu_count(),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "machine": platform.machine(),
            "date": datetime.date.today().isoformat(),
        },
    }


def table(result: dict) -> str:
    """The result as markdown."""
    s = result["settings"]

    def fmt(row: dict) -> str:
        ref = row["reference"]
        ratio = f"{row['objective'] / ref['objective']:.4f}" if ref else "n/a (see next row)"
        target = TARGET_SECONDS.get(row["n"])
        met = "" if target is None else (" (met)" if row["total_s"] <= target else f" (over {target:.0f})")
        reference = f"{ref['objective']:.6g} ({ref['kmeans_s']:.0f} s)" if ref else "not run"
        return (
            f"| {row['case']} | {row['n']:,} | {row['k']:,} | 4 | {row['kmeans_s']:.1f} | {row['assign_s']:.1f} | "
            f"{row['total_s']:.1f}{met} | {row['objective']:.6g} | {reference} | {ratio} |"
        )

    lines = [
        f"CCE's clustering step at d=4: `compemb.cluster.kmeans` (niter=50, max_points_per_centroid=256, defaults "
        f"otherwise: graph-restricted assignment steps with 16 neighbours, uniform seeds) plus exact `assign` "
        f"(faiss IndexFlatL2) of every point. Objective: mean squared distance of ALL points to their assigned "
        f"centroid. Reference: exact Lloyd's, `faiss.Kmeans(niter=50)` on all points with a flat index, assigned "
        f"exactly. torch {s['torch']}, faiss {s['faiss']}, numba {s['numba']}, {s['threads']} threads on "
        f"{s['cpus']} shared cores (load average {s['load_average_at_end']} at the end), seed {s['seed']}, "
        f"{s['date']}{', QUICK (sizes / 10)' if s['quick'] else ''}.",
        "",
        "| case | n | k | d | k-means s | assign s | total s | objective | exact reference (its k-means s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[fmt(row) for row in result["rows"]],
        "",
        f"Targets: total <= 10 s at 1M / k=5,000 and <= 120 s at 10M / k=50,000; ratio <= {TARGET_RATIO}. At 10M the "
        "exact reference (50 iterations of a flat search as slow as the assignment above: ~20 min) was not run: the "
        "row after each 10M row runs the same settings on a uniform 2M-point subsample of those 10M points with "
        "k=10,000 (200 points per centroid, as at 10M), against the exact reference on that subsample.",
        "",
        "For context, the original CCE code (faiss k-means niter=50, max_points_per_centroid=256, then a dense "
        "distance matrix), measured elsewhere on this machine, NOT in this run: 1M IDs / k=5,000: 69 s k-means + "
        "39 s assignment = 108 s; 10M IDs / k=50,000: ~2.5 hours.",
    ]
    hnsw = [(row["case"], row["hnsw_assign"]) for row in result["rows"] if "hnsw_assign" in row]
    if hnsw:
        lines += [
            "",
            "Final assignment at k=50,000 through faiss IndexHNSWFlat (M=32, efSearch=64) instead of the "
            "exact IndexFlatL2, on every tenth of the 10M points:",
            "",
            "| case | points | HNSW s | flat s (pro rata) | same label as flat | objective / flat's |",
            "|---|---:|---:|---:|---:|---:|",
            *[
                f"| {case} | {h['points']:,} | {h['seconds']:.1f} | {h['flat_seconds_prorated']:.1f} | "
                f"{h['same_label']:.4f} | {h['objective_ratio']:.4f} |"
                for case, h in hnsw
            ],
        ]
    if result["levers"]:
        lines += [
            "",
            "Levers at 1M / k=5,000 (same data and reference as above; one change each from the defaults, or plain "
            "faiss k-means with fewer iterations and points per centroid, each assigned exactly):",
            "",
            "| case | variant | k-means s | assign s | total s | objective | ratio to exact |",
            "|---|---|---:|---:|---:|---:|---:|",
            *[
                f"| {r['case']} | {r['variant']} | {r['kmeans_s']:.1f} | {r['assign_s']:.1f} | {r['total_s']:.1f} | "
                f"{r['objective']:.6g} | {r['objective'] / r['reference']:.4f} |"
                for r in result["levers"]
            ],
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every size / 10 (a smoke test; results not written)")
    parser.add_argument("--no-levers", action="store_true", help="skip the alternatives at 1M")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.quick, not args.no_levers, args.seed)
    text = table(result)
    print(text)
    if not args.quick:
        atomic_write_text(RESULTS / "cluster.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(RESULTS / "cluster.md", text)


if __name__ == "__main__":
    main()
