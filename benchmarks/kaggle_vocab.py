"""Training at Criteo Kaggle's full vocabulary (33.8M ids): peak RSS beside ``memory()``, and samples/s.

Issue 9, item 7's last part: one run each of the full table and of hash, cafe and cce at 1,000x on a synthetic
set with Kaggle's unscaled cardinalities (``compemb synth --scale 1``), to show they train in this machine's
memory. Each run is a child process (``--child``) so its peak resident set is its own (``os.wait4``); the child
writes what the Trainer measured and the embeddings' ``memory()``; a finished run is read back, so the benchmark
resumes. Writes ``results/kaggle_vocab.{md,json}``.

Peak RSS counts everything the process touched: the Python interpreter and torch (~0.3 GB), the optimizer's
state (Adagrad: one float per stored float), the evaluation's logits, and the memory-mapped data's pages it read.

    compemb synth --out DATA --scale 1 --train-rows 3000000 --eval-rows 100000 --seed 2
    python benchmarks/kaggle_vocab.py --data DATA --out RUNS [--methods full,hash,cafe,cce] [--compression 1000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from compemb.io import atomic_write_text
from compemb.registry import get_method
from compemb.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
# the headline sweep's settings (benchmarks/results/kaggle_shape.md), one evaluation at the end
SETTINGS = dict(sharing="shared", optimizer="adagrad", lr=0.05, batch_size=2048, bottom=(256, 64), top=(256, 64))
METHOD_OPTIONS = {"cce": {"cluster_every": 400}}


def child(config: TrainConfig, result_path: Path) -> None:
    """Train ``config`` in this process and write what it measured to ``result_path``."""
    trainer = Trainer(config, overwrite=True)
    last = trainer.fit()
    memory = trainer.model.embeddings.memory()  # type: ignore[union-attr]  # all features together
    test = trainer.evaluate("test")
    atomic_write_text(
        result_path,
        json.dumps(
            {
                "config": asdict(config),
                "steps": trainer.step,
                "samples_per_s": last["samples_per_s"],
                "val_bce": last["bce"],
                "test_bce": test["bce"],
                "test_auc": test["auc"],
                "embedding_bytes": memory.total,
                "embedding_float_bytes": memory.float_bytes,
                "model_bytes": sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
            },
            indent=2,
        )
        + "\n",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="run directories")
    parser.add_argument("--methods", default="full,hash,cafe,cce")
    parser.add_argument("--compression", type=float, default=1000)
    parser.add_argument("--output", default=str(RESULTS / "kaggle_vocab"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        compresses = get_method(method).compresses
        config = TrainConfig(
            data=args.data,
            out=f"{args.out}/{method}",
            method=method,
            compression=args.compression if compresses else None,
            method_options=METHOD_OPTIONS.get(method, {}),
            **SETTINGS,
        )
        result_path = Path(config.out) / "vocab_result.json"
        if args.child == method:
            child(config, result_path)
            return
        if args.child is not None:
            continue
        saved = json.loads(result_path.read_text()) if result_path.exists() else None
        if saved is None or saved["config"] != json.loads(json.dumps(asdict(config))):
            process = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--child", method])
            _, status, usage = os.wait4(process.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"compemb: error: the {method} run failed (exit {os.waitstatus_to_exitcode(status)})")
            saved = json.loads(result_path.read_text())
            saved["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
            atomic_write_text(result_path, json.dumps(saved, indent=2) + "\n")
        rows.append({"method": method, **{k: v for k, v in saved.items() if k != "config"}})
    if args.child is not None:
        raise SystemExit(f"compemb: error: --child {args.child!r} is not one of --methods")
    manifest = json.loads((Path(args.data) / "manifest.json").read_text())
    ids, train_rows = sum(manifest["cardinalities"]), manifest["rows"]["train"]
    lines = [
        f"{ids:,} ids ({len(manifest['cardinalities'])} features), {train_rows:,} training rows, one epoch; "
        f"compression {args.compression:g} for every method but the full table.",
        "",
        "| method | embedding bytes (memory()) | trainable parameters (bytes) | peak RSS | samples/s | val BCE | test BCE | test AUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['embedding_bytes'] / 2**20:,.1f} MiB | {row['model_bytes'] / 2**20:,.1f} MiB"
            f" | {row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['samples_per_s']:,.0f} | {row['val_bce']:.4f}"
            f" | {row['test_bce']:.4f} | {row['test_auc']:.4f} |"
        )
    text = "\n".join(lines)
    print(text)
    atomic_write_text(f"{args.output}.md", text + "\n")
    atomic_write_text(
        f"{args.output}.json",
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "data": args.data,
                "ids": ids,
                "train_rows": train_rows,
                "settings": {**SETTINGS, "compression": args.compression},
                "rows": rows,
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
