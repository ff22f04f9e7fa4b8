"""Why a founding method does or does not win on its planted set (issue 34 item 1): one seed each.

- CCE on the clusters set: after training, how well each column's pointers recover the planted clusters (per
  feature, the traffic-weighted share of ids whose pointer's heaviest planted cluster is their own: 1 is perfect).
- CAFE on the hot set: how many of the planted hot ids of the compressed fields own a hot row at steps 50, 200 and
  the end, and how many hot rows there are, under the paper's hot policy and under "top".

    python benchmarks/premise_diagnose.py runs/premise   (the sets of benchmarks/premise.sh; ~2 minutes)
    python benchmarks/premise_diagnose.py runs/premise data-hot4   (CAFE alone, on another hot set)

Model and recipe as premise.sh's Adagrad runs (100x, one shared table, seed 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from compemb.data.synthetic import SyntheticConfig, Teacher
from compemb.train import TrainConfig, Trainer


def teacher_of(data: Path) -> Teacher:
    """The planted teacher of a synthetic data set, rebuilt from its manifest."""
    config = json.loads((data / "manifest.json").read_text())["config"]
    return Teacher(SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}))


def trainer_for(data: Path, method: str, out: Path, options: dict | None = None) -> Trainer:
    config = TrainConfig(
        data=str(data),
        out=str(out),
        method=method,
        method_options=options or {},
        compression=100,
        sharing="shared",
        embedding_dim=16,
        bottom=(64,),
        top=(64,),
        optimizer="adagrad",
        lr=0.05,
        table_optimizer=None,
        table_lr=None,
        batch_size=2048,
        evals_per_epoch=3,
    )
    return Trainer(config, overwrite=True)


def traffic(teacher: Teacher, feature: int) -> np.ndarray:
    """Each id's share of its feature's rows."""
    shares = np.diff(np.concatenate([[0.0], teacher.cumulative[feature]]))
    weights = np.zeros(len(shares))
    weights[teacher.popular_ids[feature]] = shares
    return weights


def cce_purity(root: Path) -> list[float]:
    data = root / "data-clusters"
    teacher, trainer = teacher_of(data), trainer_for(data, "cce-paper", root / "diagnose-cce")
    trainer.fit()
    pointers = trainer.model.embeddings.embeddings["shared"].pointer_table.long().numpy()
    offsets = np.concatenate([[0], np.cumsum(teacher.cardinalities)])
    purities = []
    for column in range(pointers.shape[1]):
        per_feature = []
        for f in range(len(teacher.cardinalities)):
            planted = np.unique(teacher.vectors[f], axis=0, return_inverse=True)[1].ravel()
            chosen, weights = pointers[offsets[f] : offsets[f + 1], column], traffic(teacher, f)
            per_feature.append(
                sum(np.bincount(planted[chosen == p], weights=weights[chosen == p]).max() for p in np.unique(chosen))
            )
        purities.append(float(np.mean(per_feature)))
    return purities


def cafe_hot_rows(root: Path, hot_policy: str = "threshold", hot_set: str = "data-hot") -> dict[str, int]:
    data = root / hot_set
    teacher = teacher_of(data)
    trainer = trainer_for(data, "cafe", root / f"diagnose-cafe-{hot_set}-{hot_policy}", {"hot_policy": hot_policy})
    table = trainer.model.embeddings.embeddings["shared"]
    offsets = np.concatenate([[0], np.cumsum(teacher.cardinalities)])
    compressed = ~table.field_direct.numpy()
    hot = np.concatenate([ids + offsets[f] for f, ids in enumerate(teacher.hot_ids()) if compressed[f]])
    found = {"planted hot ids (compressed fields)": len(hot), "hot rows": table.hot_rows}
    # Space-Saving's bound: with m of a batch's score mass spread over s slots, an id whose share of it is below
    # about 1/s cannot be told from the churn of newcomers (each inherits the bucket's minimum)
    fields = [f for f in range(len(teacher.cardinalities)) if compressed[f]]
    shares = np.concatenate([traffic(teacher, f)[teacher.hot_ids()[f]] / len(fields) for f in fields])
    slots = table.sketch.num_buckets * table.sketch.slots
    found["sketch slots"] = slots
    found["planted hot ids with a share of the scored occurrences below 1/slots"] = int((shares < 1 / slots).sum())
    for stop in (50, 200, None):
        trainer.fit(stop_at=stop)
        score, row = table.sketch.query(torch.from_numpy(hot))
        found[f"owned at step {stop or 'end'}"] = int((row >= 0).sum())
    found["never in the sketch at the end"] = int((score == 0).sum())
    return found


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/premise")
    hot_set = sys.argv[2] if len(sys.argv) > 2 else "data-hot"
    if len(sys.argv) <= 2:
        purity = cce_purity(root)
        print(
            "CCE (cce-paper, 100x): traffic-weighted purity of each column's pointers:",
            ", ".join(f"{p:.3f}" for p in purity),
        )
    for policy in ("threshold", "top"):
        for key, value in cafe_hot_rows(root, policy, hot_set).items():
            print(f"CAFE ({hot_set}, 100x, hot_policy={policy}): {key}: {value}")
