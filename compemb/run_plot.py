"""A run's curves: the logged train loss and the validation BCE at every evaluation, against the step, as a PNG."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from compemb.io import atomic_write_bytes
from compemb.outputs import check_output_file, png_metadata

CURVES = "curves.png"  # where `compemb train` draws its run's curves, in the run directory


def plot_run(run: str | os.PathLike, path: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Draw ``run``'s ``metrics.jsonl`` (train loss and validation BCE per evaluation, the Bayes BCE where known)
    to ``path`` (default: ``RUN/curves.png``); return the path. ValueError when the run has logged nothing; an
    existing ``path`` that is not a compemb PNG is replaced only with ``overwrite``."""
    run = Path(run)
    target = Path(path) if path is not None else run / CURVES
    check_output_file(target, "png", overwrite=overwrite, own=run)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run} is not a compemb run: no metrics.jsonl")
    records = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = False
        if record is None:
            continue
        if not isinstance(record, dict) or not all(key in record for key in ("step", "bce", "train_loss")):
            raise ValueError(
                f"{metrics}:{number}: not an evaluation record (a JSON object with step, bce and "
                f"train_loss): the file was edited or damaged"
            )
        records.append(record)
    if not records:
        raise ValueError(f"{metrics} holds no evaluation yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in records]
    style = "o-" if len(records) > 1 else "o"
    axes.plot(steps, [r["train_loss"] for r in records], style, label="train loss (running mean)")
    axes.plot(steps, [r["bce"] for r in records], style, label=f"{records[-1].get('split', 'val')} BCE")
    if records[-1].get("bayes_bce") is not None:
        axes.axhline(records[-1]["bayes_bce"], color="black", linestyle="--", label="Bayes-optimal BCE")
    axes.set_xlabel("step")
    axes.set_ylabel("binary cross-entropy")
    axes.set_title(run.name)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight", metadata=png_metadata())
    plt.close(figure)
    atomic_write_bytes(target, buffer.getvalue())
    return target
