"""The papers' headline experiments at Criteo Kaggle's shape; writes results/kaggle_shape.{md,csv} and plots.

Issue 9, item 7. Data: ``compemb synth --scale 0.1`` (Criteo Kaggle's 26 cardinalities / 10: 3.4M ids) with
4.5M training rows (Kaggle's 1.33 rows per id), one epoch. One shared table over every feature's ids
(``--sharing shared``), sparse gradients with Adagrad, as the papers train. Three passes, each resumable (a
finished run is read back, so the benchmark can be built up over several sittings):

1. every method at 10x, 100x, 1,000x and 10,000x, one seed;
2. seeds 0-2 for the rows CAFE's claim rests on (hash, qr, cafe, cafe-ml, cafe with the paper's table, and cce at
   1,000x and 10,000x);
3. seeds 0-2 for the runs that decide CCE's claim: for cce and the method that matches the full table with the
   fewest params after it, the two ratios around where its val BCE crosses the full table's (and the full table);
4. below 10x (2x, 5x), one seed, for the methods that come closest to the full table at 10x: no method matches
   it at 10x-10,000x, so where each crosses it is only found here.

The full table of the sweep is one shared table too (``--sharing shared``: DLRM's init for one table of all 3.4M
ids, the init every shared method gets); the full table with a table per feature (each feature's own init, what
a user of full tables trains) is a reference run in ``OUT/reference``, and CCE's claim is judged against both.

Then the two claims, as the papers state them:

- CAFE (SIGMOD 2024): test AUC of cafe minus the hashing trick's at 1,000x and 10,000x (paper: +3.92% at 10,000x);
- CCE (NeurIPS 2023): the fewest params at which each method matches the full table's val BCE, and whether CCE
  needs at most half of the next best's.

A difference is called a win only when it is larger than the seed spread (the larger of the two sds).

    python benchmarks/kaggle_shape.py --data DATA --out RUNS [--passes 1,2,3,4] [--only cce,qr]

``--only`` trains only the named methods' runs (to share the sweep between processes: never give two
processes the same method); the tables are written from every finished run either way.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

from compemb.bench.quality import (
    SweepRow,
    collect_rows,
    markdown_table,
    match_table,
    params_to_match,
    run_sweep,
    write_results,
)
from compemb.io import atomic_write_text
from compemb.train import TrainConfig

RESULTS = Path(__file__).parent / "results"
# cce (every id's pointers counted) cannot pass 16x at d=16: its rows above that say so; cce-paper and cce-hybrid reach
# every ratio (the paper's accounting; pointers for a sketch's top ids)
METHODS = [
    "full",
    "hash",
    "qr",
    "ce",
    "offline",
    "cce",
    "cce-paper",
    "cce-hybrid",
    "cafe",
    "cafe-ml",
    "cafe:tuning=paper",
]
RATIOS = [10, 100, 1000, 10000]
CAFE_CLAIM = (["hash", "qr", "ce", "cafe", "cafe-ml", "cafe:tuning=paper", "cce-hybrid"], [1000, 10000])
SEEDS = 3
BELOW_TEN = (["hash", "qr", "ce", "cce", "cafe"], [2, 5])


def base_config(data: str, out: str) -> TrainConfig:
    """The settings every run of the experiment shares."""
    return TrainConfig(
        data=data,
        out=out,
        sharing="shared",
        optimizer="adagrad",
        lr=0.05,
        table_optimizer=None,
        table_lr=None,
        batch_size=2048,
        bottom=(256, 64),
        top=(256, 64),
        evals_per_epoch=6,
    )  # CCE: its default schedule


def _stats(rows: list[SweepRow], method: str, ratio: float, key: str) -> tuple[float, float, int] | None:
    values = [
        getattr(r, key) for r in rows if r.method == method and r.ratio_asked == ratio and getattr(r, key) is not None
    ]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def pivot(rows: list[SweepRow], key: str) -> str:
    """One line per method, one column per ratio: the mean of ``key`` over seeds (± sd with more than one)."""
    ratios = sorted({r.ratio_asked for r in rows if r.method != "full"})
    lines = ["| method | " + " | ".join(f"{ratio:g}x" for ratio in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for method in dict.fromkeys(r.method for r in rows if r.method != "full"):
        cells = []
        for ratio in ratios:
            stats = _stats(rows, method, ratio, key)
            if stats is None:
                cells.append("—")
            else:
                cells.append(f"{stats[0]:.4f}" + ("" if math.isnan(stats[1]) else f" ± {stats[1]:.4f} ({stats[2]})"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    full = _stats(rows, "full", 1.0, key)
    if full is not None:
        lines.append(f"\nFull table (1x): {full[0]:.4f}" + ("" if math.isnan(full[1]) else f" ± {full[1]:.4f}"))
    return "\n".join(lines)


def cafe_claim(rows: list[SweepRow]) -> str:
    """CAFE minus hash (and the other methods minus hash) in test AUC at the claim's ratios."""
    lines = [
        "| method | ratio | seeds | test AUC | minus hash | relative | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for ratio in CAFE_CLAIM[1]:
        hash_auc = _stats(rows, "hash", ratio, "test_auc")
        for method in CAFE_CLAIM[0]:
            mine = _stats(rows, method, ratio, "test_auc")
            if mine is None or hash_auc is None:
                note = next((r.note for r in rows if r.method == method and r.ratio_asked == ratio and r.note), "")
                lines.append(f"| {method} | {ratio:g} | 0 | — | — | — | {note[:70] or 'not run'} |")
                continue
            sd = f" ± {mine[1]:.4f}" if not math.isnan(mine[1]) else ""
            if method == "hash":
                lines.append(f"| hash | {ratio:g} | {mine[2]} | {mine[0]:.4f}{sd} | — | — | the baseline |")
                continue
            sds = [v for v in (mine[1], hash_auc[1]) if not math.isnan(v)]
            gap, spread = mine[0] - hash_auc[0], max(sds) if sds else math.nan
            if math.isnan(spread):
                verdict = "one seed: no spread to judge by"
            elif abs(gap) <= spread:
                verdict = f"within the spread ({spread:.4f}): no difference"
            else:
                verdict = ("better" if gap > 0 else "worse") + f" than hash beyond the spread ({spread:.4f})"
            lines.append(
                f"| {method} | {ratio:g} | {mine[2]} | {mine[0]:.4f}{sd} | {gap:+.4f} | "
                f"{gap / hash_auc[0]:+.2%} | {verdict} |"
            )
    return "\n".join(lines)


def per_feature_reference(base: TrainConfig, out: Path) -> TrainConfig:
    """The full table with a table per feature, each with its own init: the reference outside the shared sweep."""
    return replace(base, sharing="per_feature", out=str(out / "reference"))


def cce_claim(rows: list[SweepRow]) -> str:
    """Params to match the full table per method, and whether CCE needs <= 1/2 of the next best."""
    target = statistics.fmean(r.val_bce for r in rows if r.method == "full" and r.val_bce is not None)
    needed = {}
    for method in {r.method for r in rows if r.method != "full"}:
        value = params_to_match([r for r in rows if r.method == method], target)
        if value is not None:
            needed[method] = value
    text = match_table(rows)
    if "cce" not in needed:
        return text + "\n\nCCE's claim: cce does not reach the full table's val BCE at the sizes tried: **not met**."
    others = sorted((v, m) for m, v in needed.items() if not m.startswith("cce"))
    if not others:
        return (
            text + f"\n\nCCE's claim: cce matches with {needed['cce']:,.0f} params; no other method matches at "
            "the sizes tried, so it needs less than any of them: **met** (by the sizes tried)."
        )
    best_value, best = others[0]
    share = needed["cce"] / best_value
    verdict = "met" if share <= 0.5 else "not met"
    also = ", ".join(f"{m}: {needed[m]:,.0f}" for m in needed if m.startswith("cce") and m != "cce")
    return text + (
        f"\n\nCCE's claim: cce matches the full table with {needed['cce']:,.0f} params, the next best "
        f"({best}) with {best_value:,.0f}: {share:.2f}x its params, **{verdict} at the means** (the claim: "
        "<= 0.5x)."
        + (f" With paper accounting: {also}." if also else "")
        + "\n\n"
        + crossing_spread(rows, ["cce", best])
    )


def crossing_spread(rows: list[SweepRow], methods: list[str]) -> str:
    """Whether each method's val BCE at its first size reaching the full table's is apart from it beyond the seeds'
    spread: the params-to-match figure is only as sure as that crossing."""
    full = _stats(rows, "full", 1.0, "val_bce")
    lines = []
    for method in methods:
        points = sorted({r.ratio_asked for r in rows if r.method == method}, reverse=True)
        for ratio in points:
            mine = _stats(rows, method, ratio, "val_bce")
            if mine is not None and full is not None and mine[0] <= full[0]:
                sds = [v for v in (mine[1], full[1]) if not math.isnan(v)]
                spread = max(sds) if sds else math.nan
                apart = not math.isnan(spread) and full[0] - mine[0] > spread
                lines.append(
                    f"{method} at {ratio:g}x: val BCE {mine[0]:.4f} ± {mine[1]:.4f} ({mine[2]} seeds) against "
                    f"the full table's {full[0]:.4f} ± {full[1]:.4f}: "
                    + (
                        "below it beyond the spread."
                        if apart
                        else "within the spread, so the crossing (and the params it gives) is not sure."
                    )
                )
                break
    return " ".join(lines)


def deciding_runs(rows: list[SweepRow]) -> list[tuple[str, list[float]]]:
    """For cce and the best other method: the two ratios around the crossing of the full table's val BCE."""
    target = statistics.fmean(r.val_bce for r in rows if r.method == "full" and r.val_bce is not None)
    needed = {
        m: params_to_match([r for r in rows if r.method == m], target) for m in {r.method for r in rows} if m != "full"
    }
    others = sorted((v, m) for m, v in needed.items() if v is not None and not m.startswith("cce"))
    chosen = ["cce"] + ([others[0][1]] if others else [])
    plan = []
    for method in chosen:
        points = sorted((r.ratio_asked, r.val_bce) for r in rows if r.method == method and r.val_bce is not None)
        # ratios descending = params ascending: the first that reaches the target, and the one before it
        descending = sorted(points, reverse=True)
        for index, (ratio, value) in enumerate(descending):
            if value <= target:
                plan.append((method, [descending[max(0, index - 1)][0], ratio]))
                break
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="the sweep's directory (runs/ inside)")
    parser.add_argument("--passes", default="1,2,3,4")
    parser.add_argument("--output", default=str(RESULTS / "kaggle_shape"))
    parser.add_argument("--only", default="", help="comma-separated methods: train only their runs")
    args = parser.parse_args()
    base = base_config(args.data, args.out)
    passes = {int(p) for p in args.passes.split(",")}
    only = set(filter(None, args.only.split(",")))

    def sweep(methods: list[str], ratios: list[float], seeds: int) -> None:
        chosen = [m for m in methods if not only or m in only]
        if chosen:
            run_sweep(base, chosen, ratios, seeds, args.out)

    reference = per_feature_reference(base, Path(args.out))
    if 1 in passes:
        sweep(METHODS, RATIOS, 1)
        if not only or "full" in only:
            run_sweep(reference, ["full"], [1], 1, reference.out)
    if 2 in passes:
        sweep(*CAFE_CLAIM, SEEDS)
    if 3 in passes:
        sweep(["full"], [1], SEEDS)
        for method, ratios in deciding_runs(collect_rows(base, Path(args.out))):
            sweep([method], ratios, SEEDS)
    if 4 in passes:
        sweep(*BELOW_TEN, 1)
    rows = collect_rows(base, Path(args.out), first=METHODS)
    write_results(rows, Path(args.out))  # the sweep's own table and plots, from every run
    per_feature = collect_rows(reference, Path(reference.out))
    against_per_feature = [r for r in rows if r.method != "full"] + per_feature
    full_note = ", ".join(f"val BCE {r.val_bce:.4f}, test AUC {r.test_auc:.4f} (seed {r.seed})" for r in per_feature)
    text = "\n\n".join(
        [
            "The full table below is one shared table (the init of one table of all ids, as every shared method); "
            f"with a table per feature (each feature's own init) it reaches {full_note or 'not run'}.",
            "## Test AUC (mean over seeds ± sd (seeds))",
            pivot(rows, "test_auc"),
            "## Validation BCE",
            pivot(rows, "val_bce"),
            "## Every run (means over seeds ± sd)",
            markdown_table(rows),
            "## CAFE's claim: test AUC against the hashing trick",
            cafe_claim(rows),
            "## CCE's claim: params to match the shared full table's val BCE",
            cce_claim(rows),
            "## CCE's claim against the per-feature full table",
            cce_claim(against_per_feature) if per_feature else "not run",
        ]
    )
    print(text)
    atomic_write_text(f"{args.output}.md", text + "\n")
    shutil.copyfile(Path(args.out) / "results.csv", f"{args.output}.csv")
    for plot in ("bce", "auc", "bce_params"):
        if (Path(args.out) / f"{plot}.png").exists():
            shutil.copyfile(Path(args.out) / f"{plot}.png", f"{args.output}_{plot}.png")


if __name__ == "__main__":
    main()
