"""The default recipe: the MLPs' optimizer x the tables' own, a short seeded sweep of what a newcomer trains first.

Every run is ``compemb train --data D --method M`` with the default model, batch, epochs and evaluation, and one
recipe (``--optimizer O --lr L --table-optimizer T --table-lr U``); its result is the best validation BCE (the
checkpoint ``best``). The grid runs on the two small sets a newcomer meets (the README's synthetic set and the
shared Criteo sample); the 10 recipes nearest the best there, and each set's best, are confirmed on fresh seeds on
those sets and on a larger synthetic set, where a rate that helps a 25-step run could overshoot. The confirmation
decides: a grid's best is the luckiest of 72 draws. Finished runs are read back from their metrics.jsonl (the sweep
resumes).

    python benchmarks/default_recipe.py runs/recipes benchmarks/results   # about 2 hours on 2 cores
    python benchmarks/default_recipe.py runs/recipes benchmarks/results synth-400k   # that set's part alone

Results: ``benchmarks/results/default_recipe.md`` (each data set and method: every confirmed recipe's mean ± sd
over the seeds and its paired distance from the best) and ``default_recipe.csv`` (the grid's rows too).
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import sys
from pathlib import Path

from compemb.bench.stats import paired
from compemb.data.criteo import preprocess_criteo
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.io import atomic_write_text
from compemb.train import TrainConfig, Trainer

MLPS = [
    ("adam", 3e-4),
    ("adam", 1e-3),
    ("adam", 1.5e-3),
    ("adam", 2e-3),
    ("adam", 3e-3),
    ("adagrad", 0.01),
    ("adagrad", 0.05),
    ("sgd", 0.1),
]
TABLES = [
    ("adam", 3e-3),
    ("adam", 1e-2),
    ("adam", 3e-2),
    ("adam", 0.1),
    ("rowwise_adagrad", 0.05),
    ("rowwise_adagrad", 0.1),
    ("rowwise_adagrad", 0.2),
    ("adagrad", 0.05),
    ("sgd", 0.1),
]
METHODS = [("full", None), ("hash", 10.0)]
# the Criteo sample's one epoch is 3 steps over 5,760 rows, scored on 720: one seed's BCE varies by ~0.03, so it
# takes 10 seeds for a mean to tell recipes apart
GRID_SEEDS = {"synth-50k": (0, 1, 2), "criteo-sample": tuple(range(10))}
# fresh seeds for the finalists: the grid's best is the luckiest of 72 draws, its mean biased low
CONFIRM_SEEDS = {
    "synth-50k": tuple(range(10, 20)),
    "criteo-sample": tuple(range(10, 40)),
    "synth-400k": tuple(range(10, 15)),
}
FINALISTS = 10  # the recipes the confirmation decides between
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-kaggle-sample" / "train.txt"


def data_sets(out: Path) -> dict[str, Path]:
    """The sets the sweep trains on, made once: the README's synthetic set, the Criteo sample, a larger set."""
    sets = {
        "synth-50k": out / "data" / "synth-50k",
        "criteo-sample": out / "data" / "criteo-sample",
        "synth-400k": out / "data" / "synth-400k",
    }
    if not (sets["synth-50k"] / "manifest.json").exists():  # the README's quick start
        generate_synthetic(
            sets["synth-50k"],
            SyntheticConfig(rows={"train": 50_000, "val": 5_000, "test": 5_000}, scale=1e-3, seed=0),
            progress=False,
        )
    if not (sets["synth-400k"] / "manifest.json").exists():
        generate_synthetic(
            sets["synth-400k"],
            SyntheticConfig(rows={"train": 400_000, "val": 20_000, "test": 20_000}, scale=1e-2, seed=0),
            progress=False,
        )
    if not (sets["criteo-sample"] / "manifest.json").exists():
        preprocess_criteo(SAMPLE, sets["criteo-sample"], progress=False)
    return sets


def name_of(mlps: tuple[str, float], tables: tuple[str, float]) -> str:
    return f"{mlps[0]} {mlps[1]:g} / {tables[0]} {tables[1]:g}"


def best_bce(data: Path, run: Path, method: tuple[str, float | None], mlps, tables, seed: int) -> float:
    """The run's best validation BCE, trained now unless it finished before."""
    metrics, done = run / "metrics.jsonl", run / "done"
    if not done.exists():
        config = TrainConfig(
            data=str(data),
            out=str(run),
            method=method[0],
            compression=method[1],
            optimizer=mlps[0],
            lr=mlps[1],
            table_optimizer=tables[0],
            table_lr=tables[1],
            seed=seed,
            checkpoint_minutes=0,
        )
        Trainer(config, overwrite=True, quiet=True).fit()
        atomic_write_text(done, "")
    return min(json.loads(line)["bce"] for line in metrics.read_text().splitlines())


def sweep(
    sets: dict[str, Path], out: Path, names: list[str], recipes, seeds_of: dict[str, tuple[int, ...]], stage: str
) -> list[dict]:
    """Every recipe x method x seed on the sets ``names``: one row per (set, method, recipe), its BCE by seed."""
    rows = []
    for set_name, method, (mlps, tables) in itertools.product(names, METHODS, recipes):
        label = name_of(mlps, tables)
        by_seed = {}
        for seed in seeds_of[set_name]:
            run = out / "runs" / set_name / method[0] / f"{mlps[0]}{mlps[1]:g}_{tables[0]}{tables[1]:g}_s{seed}"
            by_seed[seed] = best_bce(sets[set_name], run, method, mlps, tables, seed)
        values = list(by_seed.values())
        rows.append(
            {
                "stage": stage,
                "data": set_name,
                "method": method[0],
                "recipe": label,
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values),
                "seeds": len(values),
                "by_seed": by_seed,
            }
        )
        print(f"{stage} {set_name} {method[0]} {label}: {rows[-1]['mean']:.4f} ± {rows[-1]['sd']:.4f}", flush=True)
    return rows


def distances(rows: list[dict]) -> None:
    """Each row's distance from the best mean of its (set, method), with the paired 95% interval of it (the same
    seeds: the same initial weights, hashes and batch order, only the optimizers differ)."""
    for row in rows:
        group = [r for r in rows if (r["data"], r["method"]) == (row["data"], row["method"])]
        best = min(group, key=lambda r: r["mean"])
        comparison = paired(row["by_seed"], best["by_seed"])
        row["from_best"] = row["mean"] / best["mean"] - 1
        row["from_best_low"] = (comparison.low or 0.0) / best["mean"]
        row["from_best_high"] = (comparison.high or 0.0) / best["mean"]


def grid_finalists(rows: list[dict], grid) -> list:
    """The grid's FINALISTS recipes nearest the best in every (set, method) (by their largest distance from it),
    and each (set, method)'s best recipe."""
    worst: dict[str, float] = {}
    for row in rows:
        worst[row["recipe"]] = max(worst.get(row["recipe"], 0.0), row["from_best"])
    finalists = sorted(grid, key=lambda recipe: worst[name_of(*recipe)])[:FINALISTS]
    for row in rows:
        recipe = next(r for r in grid if name_of(*r) == row["recipe"])
        if row["from_best"] == 0 and recipe not in finalists:
            finalists.append(recipe)
    return finalists


def main(out: str, results: str, only: str | None = None) -> None:
    out_path, results_path = Path(out), Path(results)
    sets = data_sets(out_path)
    grid = list(itertools.product(MLPS, TABLES))
    small = ["synth-50k", "criteo-sample"]
    if only is not None and only not in sets:
        raise SystemExit(f"default_recipe: unknown set {only!r}; one of {', '.join(sets)}")
    rows = sweep(sets, out_path, small, grid, GRID_SEEDS, "grid")  # read back where it ran before
    distances(rows)
    finalists = grid_finalists(rows, grid)
    confirmed = sweep(sets, out_path, [s for s in sets if only in (None, s)], finalists, CONFIRM_SEEDS, "confirm")
    if only is not None:  # one set's part alone (a second process beside the first); the full call reads it back
        return
    distances(confirmed)
    rows += confirmed
    recipes = list(dict.fromkeys(r["recipe"] for r in confirmed))
    everywhere = {recipe: max(r["from_best"] for r in confirmed if r["recipe"] == recipe) for recipe in recipes}
    # a recipe is not shown to be further than 0.5% from the best where its interval's low end is within it
    plausible = {recipe: max(r["from_best_low"] for r in confirmed if r["recipe"] == recipe) for recipe in recipes}
    ranked = sorted(everywhere, key=everywhere.get)
    results_path.mkdir(parents=True, exist_ok=True)
    fields = [
        "stage",
        "data",
        "method",
        "recipe",
        "mean",
        "sd",
        "seeds",
        "from_best",
        "from_best_low",
        "from_best_high",
    ]
    with open(results_path / "default_recipe.csv.tmp", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    Path(results_path / "default_recipe.csv.tmp").replace(results_path / "default_recipe.csv")
    groups = list(dict.fromkeys((r["data"], r["method"]) for r in confirmed))
    lines = [
        "| MLPs / tables | worst distance | " + " | ".join(f"{d} {m}" for d, m in groups) + " |",
        "|---|---:|" + "---:|" * len(groups),
    ]
    for recipe in ranked:
        cells = []
        for group in groups:
            row = next(r for r in confirmed if (r["data"], r["method"], r["recipe"]) == (*group, recipe))
            cells.append(
                f"{row['mean']:.4f} ± {row['sd']:.4f}<br>{row['from_best']:+.2%} "
                f"[{row['from_best_low']:+.2%}, {row['from_best_high']:+.2%}]"
            )
        lines.append(f"| {recipe} | {everywhere[recipe]:+.2%} | " + " | ".join(cells) + " |")
    chosen = ranked[0]
    within = [recipe for recipe in ranked if everywhere[recipe] <= 0.005]
    not_shown_out = [recipe for recipe in ranked if plausible[recipe] <= 0.005]
    verdict = (
        f"The default (TrainConfig's and the CLI's): **{chosen}**, the confirmed recipe whose largest distance "
        f"from the best of any set and method is the smallest ({everywhere[chosen]:+.2%}). Within 0.5% of the "
        f"best everywhere (means): {', '.join(within) if within else 'no recipe'}. Not shown to be further "
        f"than 0.5% anywhere (the interval's low end within it): "
        f"{', '.join(not_shown_out) if not_shown_out else 'no recipe'}."
    )
    best_of = "\n".join(
        f"- {d} {m}: best {min(r['mean'] for r in confirmed if (r['data'], r['method']) == (d, m)):.4f} "
        f"({min((r for r in confirmed if (r['data'], r['method']) == (d, m)), key=lambda r: r['mean'])['recipe']})"
        for d, m in groups
    )
    seeds = "; ".join(f"{name} {len(CONFIRM_SEEDS[name])} seeds" for name in sets)
    text = (
        f"# The default recipe\n\nEvery run: `compemb train --data D --method M` (hash at 10x) with the defaults "
        f"(DLRM dim 16, bottom 512-256-64, top 512-256, batch 2048, one epoch, evaluated at its end) and one "
        f"recipe; its result is the best validation BCE. Sets: synth-50k (`compemb synth --train-rows 50000 "
        f"--eval-rows 5000 --scale 1e-3`, the README's), criteo-sample (the shared 7,200-line Criteo sample), "
        f"synth-400k (`--train-rows 400000 --eval-rows 20000 --scale 1e-2`).\n\nTwo stages. The grid: "
        f"{len(grid)} recipes on the two small sets (seeds 0-2, 0-9 on the Criteo sample). The confirmation: the "
        f"{FINALISTS} recipes nearest the grid's best in every small (set, method) and each one's best recipe, "
        f"{len(finalists)} in all, on fresh seeds ({seeds}; from 10) on all three sets, so that the best is not "
        f"the luckiest of {len(grid)} draws. Cells: mean ± sd over the seeds, the distance from the (set, "
        f"method)'s best confirmed mean and its paired 95% interval (seed by seed: the same initial weights, "
        f"hashes and batch order). Rows by their largest distance.\n\nCommand: `python "
        f"benchmarks/default_recipe.py {out} {results}` (resumable; "
        f"`... synth-400k` runs one set's part beside it).\n\n{verdict}\n\nBest of each:\n{best_of}\n\n"
        + "\n".join(lines)
        + "\n\nThe grid's rows (stage `grid`) are in default_recipe.csv.\n"
    )
    atomic_write_text(results_path / "default_recipe.md", text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:4])
