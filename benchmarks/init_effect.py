"""What the table init does to each method: DLRM's init against the old U(+-1/sqrt(d)); writes results/init_effect.*.

Issue 9, item 1: every method starts an id's vector at the scale the full table of its feature would give it
(``init="dlrm"``); ``init="uniform_dim"`` keeps the old rule. This trains the main job's setting (``make run``:
101k ids, 300k training rows, one shared table at 100x, Adagrad, one epoch, the best of 3 validation checkpoints)
with both inits over ``--seeds`` seeds and reports, per method, the mean val and test BCE of each init, their
difference and whether it is larger than the seed spread. Resumable: finished runs are read back.

    python benchmarks/init_effect.py --out RUNS [--data DATA] [--seeds 3] [--train dlrm|uniform_dim]
    # no --data: make run's set, generated in RUNS first
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from compemb.bench.quality import SweepRow, collect_rows, markdown_table, run_sweep
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.io import atomic_write_text
from compemb.train import TrainConfig

RESULTS = Path(__file__).parent / "results"
METHODS = ["full", "hash", "qr", "ce", "hemb", "robe", "cce", "cafe", "cafe-ml"]
INITS = ("dlrm", "uniform_dim")
RATIO = 100


def base_config(data: str, out: str, init: str) -> TrainConfig:
    """make run's settings (see the Makefile), with the init under test."""
    return TrainConfig(
        data=data,
        out=out,
        sharing="shared",
        optimizer="adagrad",
        lr=0.05,
        table_optimizer=None,
        table_lr=None,
        batch_size=2048,
        bottom=(64,),
        top=(64,),
        epochs=1,
        evals_per_epoch=3,
        init=init,
        method_options={"cluster_every": 40},
    )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def effect_table(rows: dict[str, list[SweepRow]], key: str) -> str:
    """Per method: ``key``'s mean ± sd under each init, dlrm minus uniform_dim, and whether it beats the spread."""
    lines = ["| method | dlrm | uniform_dim | dlrm - uniform_dim | verdict |", "|---|---:|---:|---:|---|"]
    for method in METHODS:
        cells, stats = [], []
        for init in INITS:
            values = [getattr(r, key) for r in rows[init] if r.method == method and getattr(r, key) is not None]
            if not values:
                cells.append("—")
                continue
            mean, sd = _mean_sd(values)
            stats.append((mean, sd))
            cells.append(f"{mean:.4f}" + ("" if math.isnan(sd) else f" ± {sd:.4f} ({len(values)})"))
        if len(stats) < 2:
            lines.append(
                f"| {method} | {cells[0] if cells else '—'} | {cells[1] if len(cells) > 1 else '—'} | — | not run |"
            )
            continue
        gap = stats[0][0] - stats[1][0]
        spreads = [s for _, s in stats if not math.isnan(s)]
        spread = max(spreads) if spreads else math.nan
        if math.isnan(spread):
            verdict = "one seed: no spread to judge by"
        elif abs(gap) <= spread:
            verdict = f"within the spread ({spread:.4f})"
        else:
            verdict = ("dlrm better" if gap < 0 else "dlrm worse") + f" beyond the spread ({spread:.4f})"
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {gap:+.4f} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the sweep's directory (one sub-directory per init)")
    parser.add_argument("--data", default=None, help="a compemb data set (default: make run's, generated in --out)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "init_effect"))
    parser.add_argument(
        "--train",
        default=",".join(INITS),
        help="the inits to train here (to share the sweep between processes); the table reads both",
    )
    args = parser.parse_args()
    out = Path(args.out)
    data = args.data
    if data is None:
        data = str(out / "data")
        if not (out / "data" / "manifest.json").exists():
            split_rows = {"train": 300_000, "val": 30_000, "test": 30_000}
            generate_synthetic(data, SyntheticConfig(rows=split_rows, scale=3e-3, seed=0))
    rows: dict[str, list[SweepRow]] = {}
    for init in INITS:
        base = base_config(data, str(out / init), init)
        if init in args.train.split(","):
            run_sweep(base, METHODS, [RATIO], args.seeds, str(out / init))
        rows[init] = collect_rows(base, out / init, first=METHODS)
    text = "\n\n".join(
        [
            f"Setting: make run's (shared table at {RATIO}x, Adagrad 0.05, batch 2048, one epoch, best of 3 validation "
            f"checkpoints), {args.seeds} seeds per init; data `{data}`.",
            "## Validation BCE by init (mean ± sd (seeds))",
            effect_table(rows, "val_bce"),
            "## Test BCE by init",
            effect_table(rows, "test_bce"),
            *[f"## Every run, init={init}\n\n" + markdown_table(rows[init]) for init in INITS],
        ]
    )
    print(text)
    atomic_write_text(f"{args.output}.md", text + "\n")


if __name__ == "__main__":
    main()
