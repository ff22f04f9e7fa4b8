"""Ops per training step of per-feature cafe and cafe-ml on the device code path (kernels="torch" on CPU), their
tables updated together (compemb.embeddings.cafe.batch) and each alone, in one run. On a GPU each op is a kernel
launch (~5-10 us), so the count bounds the step's time from below.

Data: ``compemb synth --out runs/syn25 --train-rows 400000 --eval-rows 20000 --scale 3e-2 --seed 0``;
run: ``python benchmarks/cafe_batch_ops.py [DATA]``.
"""

from __future__ import annotations

import dataclasses
import sys

from compemb.bench.syncs import count_step_syncs
from compemb.embeddings.cafe.batch import CAFETables
from compemb.train import TrainConfig


def main(data: str) -> None:
    base = TrainConfig(
        data=data,
        out="unused",
        batch_size=4096,
        embedding_dim=16,
        bottom=(256, 64),
        top=(256, 64),
        optimizer="adam",
        lr=1e-3,
        table_optimizer=None,
        table_lr=None,
        compression=100,
    )
    together = CAFETables.together
    print("| method | tables | ops/step | host waits/step |\n|---|---|---:|---:|")
    try:
        for method in ("hash", "cafe", "cafe-ml"):
            for label, rule in (("together", together), ("each alone", lambda self, ids: False)):
                CAFETables.together = rule  # type: ignore[method-assign]
                row = count_step_syncs(dataclasses.replace(base, method=method), warmup=5, steps=10)
                tables = "(one table batch)" if method == "hash" else label
                print(f"| {method} | {tables} | {row['ops_per_step']:,.0f} | {row['per_step']:.2f} |")
                if method == "hash":
                    break
    finally:
        CAFETables.together = together  # type: ignore[method-assign]


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/syn25")
