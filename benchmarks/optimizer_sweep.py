"""Which optimizers train the default DLRM stably: the MLPs' optimizer x the tables' own, a short seeded sweep.

Each run trains ``hash`` at 100x (the README's recipe) with the default model (dim 16, bottom 512-256-64, top
512-256, batch 2048) for one epoch with 4 evaluations, and records the logged train loss at every evaluation (the
running mean the Trainer logs), the best validation BCE and its gap to the Bayes BCE. Finished runs are read back
from their ``metrics.jsonl`` (the sweep resumes); results go to ``OUT/optimizer_sweep.md``.

Data: ``compemb synth --out runs/syn26 --train-rows 400000 --eval-rows 20000 --scale 1e-2 --seed 0``;
run: ``python benchmarks/optimizer_sweep.py runs/syn26 runs/optsweep benchmarks/results``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from compemb.io import atomic_write_text
from compemb.train import TrainConfig, Trainer

# (MLPs' optimizer, lr) x (tables' optimizer, lr); None: the MLPs' for the tables too
RECIPES = [
    (("sgd", 0.1), None),  # compemb's default
    (("adagrad", 0.05), None),  # the README's old recipe
    (("adam", 1e-3), None),
    (("adam", 1e-3), ("adagrad", 0.05)),
    (("adam", 1e-3), ("rowwise_adagrad", 0.05)),
    (("adam", 1e-3), ("rowwise_adagrad", 0.2)),
    (("adam", 1e-3), ("adam", 1e-2)),
    (("sgd", 0.1), ("rowwise_adagrad", 0.05)),
    (("adagrad", 0.01), ("rowwise_adagrad", 0.05)),
]
SEEDS = (0, 1)


def label(recipe: tuple) -> str:
    (dense, lr), tables = recipe
    return f"{dense} {lr:g}" + ("" if tables is None else f" / {tables[0]} {tables[1]:g}")


def run(data: str, out: Path, recipe: tuple, seed: int) -> list[dict]:
    """The run's evaluations, trained now unless a finished run is already there."""
    (dense, lr), tables = recipe
    name = f"{dense}{lr:g}" + ("" if tables is None else f"_{tables[0]}{tables[1]:g}") + f"_s{seed}"
    directory = out / name
    metrics = directory / "metrics.jsonl"
    done = directory / "done"
    if not done.exists():
        shutil.rmtree(directory, ignore_errors=True)  # an unfinished run starts again
        config = TrainConfig(
            data=data,
            out=str(directory),
            method="hash",
            compression=100,
            optimizer=dense,
            lr=lr,
            table_optimizer=None if tables is None else tables[0],
            table_lr=None if tables is None else tables[1],
            evals_per_epoch=4,
            seed=seed,
            checkpoint_minutes=0,
        )
        Trainer(config).fit()
        done.write_text("")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def main(data: str, out: str, results: str) -> None:
    rows = []
    for recipe in RECIPES:
        runs = [run(data, Path(out), recipe, seed) for seed in SEEDS]
        worst = max(r["train_loss"] for evaluations in runs for r in evaluations)
        best = [min(r["bce"] for r in evaluations) for evaluations in runs]
        gaps = [min(r["gap_to_bayes"] for r in evaluations) for evaluations in runs]
        aucs = [max(r["auc"] for r in evaluations) for evaluations in runs]
        rows.append(
            (
                label(recipe),
                worst,
                statistics.mean(best),
                statistics.pstdev(best),
                statistics.mean(gaps),
                statistics.mean(aucs),
            )
        )
        print(rows[-1], flush=True)
    lines = [
        "| MLPs / tables | largest logged train loss | best val BCE (mean ± sd) | gap to Bayes | best val AUC |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {worst:.3f} | {bce:.4f} ± {sd:.4f} | {gap:+.2%} | {auc:.4f} |"
        for name, worst, bce, sd, gap, auc in rows
    ]
    text = (
        f"Optimizers of the default DLRM (hash 100x, dim 16, bottom 512-256-64, top 512-256, batch 2048, one epoch,"
        f" 4 evaluations; seeds {', '.join(map(str, SEEDS))}; the largest train loss over every evaluation of "
        f"every seed).\n\nData: `compemb synth --out {data} --train-rows 400000 --eval-rows 20000 --scale 1e-2 "
        f"--seed 0`; command: `python benchmarks/optimizer_sweep.py {data} {out} {results}`.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    atomic_write_text(str(Path(results) / "optimizer_sweep.md"), text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:4])
