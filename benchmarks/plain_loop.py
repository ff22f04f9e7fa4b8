"""``compemb train --method full`` against a minimal hand-written DLRM loop, both inits; writes results/plain_loop.*.

Issue 9's done-when: the full-table DLRM that compemb trains on the synthetic default set is at least as good as
the same model with the DLRM init in a plain PyTorch loop (:mod:`compemb.bench.plain_loop`). Both train the
issue's model (dim 16, bottom 256-64, top 256-64, Adam 1e-3, batch 1,024, one epoch, rows in file order) and are
evaluated once at the end on the test split; each loop runs ``--seeds`` seeds with the DLRM init and
``--contrast-seeds`` with the old one, and the table gives the mean test BCE with its sd. The two loops share no code but the data reader and the metrics.

    python benchmarks/plain_loop.py [--data DIR] [--seeds 3] [--contrast-seeds 1]   # no --data: the default set
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

from compemb.bench.plain_loop import PlainConfig, train_plain
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.io import atomic_write_text
from compemb.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"


def train_compemb(plain: PlainConfig, out: str) -> dict[str, float]:
    """The same run through compemb's Trainer (full table, one evaluation at the end)."""
    config = TrainConfig(
        data=plain.data,
        out=out,
        method="full",
        embedding_dim=plain.embedding_dim,
        bottom=plain.bottom,
        top=plain.top,
        optimizer=plain.optimizer,
        lr=plain.lr,
        table_optimizer=None,
        table_lr=None,
        batch_size=plain.batch_size,
        epochs=plain.epochs,
        seed=plain.seed,
        init=plain.init,
    )
    trainer = Trainer(config, overwrite=True)
    last = trainer.fit()
    test = trainer.evaluate("test")
    return {"test_bce": test["bce"], "test_auc": test["auc"], "samples_per_s": last["samples_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a compemb data set (default: generate `compemb synth`'s default)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds with the DLRM init (the done-when comparison)")
    parser.add_argument("--contrast-seeds", type=int, default=1, help="seeds with the old init (uniform_dim)")
    parser.add_argument("--output", default=str(RESULTS / "plain_loop"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plain-loop-"))
    data = args.data
    if data is None:
        data = str(work / "data")
        generate_synthetic(data, SyntheticConfig(seed=0))
    runs = []
    for init, seeds in (("dlrm", args.seeds), ("uniform_dim", args.contrast_seeds)):
        for seed in range(seeds):
            plain = PlainConfig(data=data, seed=seed, init=init)
            for loop in ("plain", "compemb"):
                result = train_plain(plain) if loop == "plain" else train_compemb(plain, str(work / f"{init}-{seed}"))
                runs.append({"loop": loop, "init": init, "seed": seed, **result})
                print(json.dumps(runs[-1]), flush=True)
    lines = ["| loop | init | seeds | test BCE | test AUC | samples/s |", "|---|---|---:|---:|---:|---:|"]
    summary = {}
    for init in ("dlrm", "uniform_dim"):
        for loop in ("plain", "compemb"):
            group = [r for r in runs if r["loop"] == loop and r["init"] == init]
            stats = {
                key: (
                    statistics.fmean(r[key] for r in group),
                    statistics.stdev(r[key] for r in group) if len(group) > 1 else math.nan,
                )
                for key in ("test_bce", "test_auc", "samples_per_s")
            }
            summary[f"{loop}/{init}"] = {k: (m, None if math.isnan(sd) else sd) for k, (m, sd) in stats.items()}
            bce, auc = (
                f"{stats[k][0]:.4f}" + ("" if math.isnan(stats[k][1]) else f" ± {stats[k][1]:.4f}")
                for k in ("test_bce", "test_auc")
            )
            lines.append(f"| {loop} | {init} | {len(group)} | {bce} | {auc} | {stats['samples_per_s'][0]:,.0f} |")
    gap = summary["compemb/dlrm"]["test_bce"][0] - summary["plain/dlrm"]["test_bce"][0]
    spread = max(summary["compemb/dlrm"]["test_bce"][1] or 0.0, summary["plain/dlrm"]["test_bce"][1] or 0.0)
    verdict = ("met" if gap <= spread else "missed") + f": compemb - plain = {gap:+.4f} BCE (largest sd {spread:.4f})"
    lines += ["", f"Done-when (compemb full with the DLRM init at least as good as the plain loop): {verdict}."]
    text = "\n".join(lines)
    print(text)
    facts = {
        "date": datetime.date.today().isoformat(),
        "data": data,
        "config": asdict(PlainConfig(data=data)),
        "runs": runs,
        "summary": summary,
        "verdict": verdict,
    }
    atomic_write_text(f"{args.output}.md", text + "\n")
    atomic_write_text(f"{args.output}.json", json.dumps(facts, indent=2) + "\n")


if __name__ == "__main__":
    main()
