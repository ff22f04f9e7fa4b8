"""The default recipe: the MLPs' optimizer x the tables' own, a short seeded sweep of what a newcomer trains first.

Every run is ``compemb train --data D --method M`` with the default model, batch, epochs and evaluation, and one
recipe (``--optimizer O --lr L --table-optimizer T --table-lr U``); its result is the best validation BCE (the
checkpoint ``best``). The grid runs on the two small sets a newcomer meets (the README's synthetic set and the
shared Criteo sample); the 6 recipes nearest the best there run again on a larger synthetic set, where a rate that
helps a 25-step run could overshoot. Finished runs are read back from their metrics.jsonl (the sweep resumes).

    python benchmarks/default_recipe.py runs/recipes benchmarks/results   # about an hour on 2 cores
    python benchmarks/default_recipe.py runs/recipes benchmarks/results criteo-sample   # that set's grid alone

Results: ``benchmarks/results/default_recipe.md`` (each data set and method: every recipe's mean ± sd over the
seeds and its distance from the best) and ``default_recipe.csv``.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import sys
from pathlib import Path

from compemb.data.criteo import preprocess_criteo
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.io import atomic_write_text
from compemb.train import TrainConfig, Trainer

MLPS = [("adam", 3e-4), ("adam", 1e-3), ("adam", 1.5e-3), ("adam", 2e-3), ("adam", 3e-3), ("adagrad", 0.01),
        ("adagrad", 0.05), ("sgd", 0.1)]
TABLES = [("adam", 3e-3), ("adam", 1e-2), ("adam", 3e-2), ("adam", 0.1), ("rowwise_adagrad", 0.05),
          ("rowwise_adagrad", 0.1), ("rowwise_adagrad", 0.2), ("adagrad", 0.05), ("sgd", 0.1)]
METHODS = [("full", None), ("hash", 10.0)]
SEEDS = (0, 1, 2)
# the Criteo sample's one epoch is 3 steps over 5,760 rows, scored on 720: one seed's BCE varies by ~0.03, so it
# takes 10 seeds for a mean to tell recipes apart
SEEDS_OF = {"criteo-sample": tuple(range(10))}
FINALISTS = 6  # the recipes the larger set decides between
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-kaggle-sample" / "train.txt"


def data_sets(out: Path) -> dict[str, Path]:
    """The sets the sweep trains on, made once: the README's synthetic set, the Criteo sample, a larger set."""
    sets = {"synth-50k": out / "data" / "synth-50k", "criteo-sample": out / "data" / "criteo-sample",
            "synth-400k": out / "data" / "synth-400k"}
    if not (sets["synth-50k"] / "manifest.json").exists():  # the README's quick start
        generate_synthetic(sets["synth-50k"], SyntheticConfig(rows={"train": 50_000, "val": 5_000, "test": 5_000},
                                                              scale=1e-3, seed=0), progress=False)
    if not (sets["synth-400k"] / "manifest.json").exists():
        generate_synthetic(sets["synth-400k"], SyntheticConfig(rows={"train": 400_000, "val": 20_000,
                                                                     "test": 20_000}, scale=1e-2, seed=0),
                           progress=False)
    if not (sets["criteo-sample"] / "manifest.json").exists():
        preprocess_criteo(SAMPLE, sets["criteo-sample"], progress=False)
    return sets


def name_of(mlps: tuple[str, float], tables: tuple[str, float]) -> str:
    return f"{mlps[0]} {mlps[1]:g} / {tables[0]} {tables[1]:g}"


def best_bce(data: Path, run: Path, method: tuple[str, float | None], mlps, tables, seed: int) -> float:
    """The run's best validation BCE, trained now unless it finished before."""
    metrics, done = run / "metrics.jsonl", run / "done"
    if not done.exists():
        config = TrainConfig(data=str(data), out=str(run), method=method[0], compression=method[1],
                             optimizer=mlps[0], lr=mlps[1], table_optimizer=tables[0], table_lr=tables[1], seed=seed,
                             checkpoint_minutes=0)
        Trainer(config, overwrite=True, quiet=True).fit()
        atomic_write_text(done, "")
    return min(json.loads(line)["bce"] for line in metrics.read_text().splitlines())


def sweep(sets: dict[str, Path], out: Path, names: list[str], recipes) -> list[dict]:
    """Every recipe x method x seed on the sets ``names``: one row per (set, method, recipe)."""
    rows = []
    for set_name, method, (mlps, tables) in itertools.product(names, METHODS, recipes):
        label = name_of(mlps, tables)
        values = []
        for seed in SEEDS_OF.get(set_name, SEEDS):
            run = out / "runs" / set_name / method[0] / f"{mlps[0]}{mlps[1]:g}_{tables[0]}{tables[1]:g}_s{seed}"
            values.append(best_bce(sets[set_name], run, method, mlps, tables, seed))
        rows.append({"data": set_name, "method": method[0], "recipe": label, "mean": statistics.mean(values),
                     "sd": statistics.stdev(values), "seeds": len(values)})
        print(f"{set_name} {method[0]} {label}: {rows[-1]['mean']:.4f} ± {rows[-1]['sd']:.4f}", flush=True)
    return rows


def main(out: str, results: str, only: str | None = None) -> None:
    out_path, results_path = Path(out), Path(results)
    sets = data_sets(out_path)
    grid = list(itertools.product(MLPS, TABLES))
    if only is not None:  # one set's grid alone (a second process beside the first); the full call reads it back
        sweep(sets, out_path, [only], grid)
        return
    rows = sweep(sets, out_path, ["synth-50k", "criteo-sample"], grid)
    # the FINALISTS recipes nearest the best in every small (set, method) (their largest distance from it): run on
    # the larger set too
    worst = {}
    for row in rows:
        best = min(r["mean"] for r in rows if (r["data"], r["method"]) == (row["data"], row["method"]))
        worst[row["recipe"]] = max(worst.get(row["recipe"], 0.0), row["mean"] / best - 1)
    finalists = sorted(grid, key=lambda recipe: worst[name_of(*recipe)])[:FINALISTS]
    rows += sweep(sets, out_path, ["synth-400k"], finalists)
    for row in rows:
        group = [r["mean"] for r in rows if (r["data"], r["method"]) == (row["data"], row["method"])]
        row["from_best"] = row["mean"] / min(group) - 1
    recipes = list(dict.fromkeys(r["recipe"] for r in rows if r["data"] == "synth-400k"))
    everywhere = {recipe: max(r["from_best"] for r in rows if r["recipe"] == recipe) for recipe in recipes}
    ranked = sorted(everywhere, key=everywhere.get)
    results_path.mkdir(parents=True, exist_ok=True)
    with open(results_path / "default_recipe.csv.tmp", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Path(results_path / "default_recipe.csv.tmp").replace(results_path / "default_recipe.csv")
    groups = list(dict.fromkeys((r["data"], r["method"]) for r in rows))
    lines = ["| MLPs / tables | worst distance from the best | " + " | ".join(f"{d} {m}" for d, m in groups) + " |",
             "|---|---:|" + "---:|" * len(groups)]
    for recipe in ranked:
        cells = []
        for group in groups:
            row = next(r for r in rows if (r["data"], r["method"], r["recipe"]) == (*group, recipe))
            cells.append(f"{row['mean']:.4f} ± {row['sd']:.4f} ({row['from_best']:+.2%})")
        lines.append(f"| {recipe} | {everywhere[recipe]:+.2%} | " + " | ".join(cells) + " |")
    chosen = ranked[0]
    within = [recipe for recipe in ranked if everywhere[recipe] <= 0.005]
    verdict = (f"The default (TrainConfig's and the CLI's): **{chosen}**, the recipe whose largest distance from the "
               f"best of any set and method is the smallest ({everywhere[chosen]:+.2%}). Within 0.5% of the best "
               f"everywhere: {', '.join(within) if within else 'no recipe'}.")
    best_small = "\n".join(
        f"- {d} {m}: best {min(r['mean'] for r in rows if (r['data'], r['method']) == (d, m)):.4f} "
        f"({next(r['recipe'] for r in sorted(rows, key=lambda r: r['mean']) if (r['data'], r['method']) == (d, m))})"
        for d, m in groups)
    text = (f"# The default recipe\n\nEvery run: `compemb train --data D --method M` (hash at 10x) with the defaults "
            f"(DLRM dim 16, bottom 512-256-64, top 512-256, batch 2048, one epoch, evaluated at its end) and one "
            f"recipe; mean ± sd of the best validation BCE over seeds {', '.join(map(str, SEEDS))} (10 on the Criteo sample). Sets: "
            f"synth-50k (`compemb synth --train-rows 50000 --eval-rows 5000 --scale 1e-3`, the README's), "
            f"criteo-sample (the shared 7,200-line Criteo sample), synth-400k (`--train-rows 400000 --eval-rows "
            f"20000 --scale 1e-2`). The {len(grid)} recipes ran on the two small sets; the {len(finalists)} nearest the "
            f"best in all of them (by their largest distance from it) ran on synth-400k too. Rows: those recipes, by their largest distance from "
            f"the best recipe of any set and method.\n\nCommand: `python benchmarks/default_recipe.py {out} "
            f"{results}`.\n\n{verdict}\n\nBest of each:\n{best_small}\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(results_path / "default_recipe.md", text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:4])
