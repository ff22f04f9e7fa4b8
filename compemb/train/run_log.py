"""What a run writes as it trains (rank 0): its lines in ``train.log`` (and on the terminal), every evaluation as a
record in ``metrics.jsonl``, TensorBoard scalars where asked."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from compemb.io import atomic_write_text
from compemb.train.checkpoints import CheckpointError
from compemb.train.run_dir import LOG_FILE

METRICS_FILE = "metrics.jsonl"


class RunLog:
    """The run's record in ``out``, written by rank 0 alone (every other rank's calls do nothing)."""

    def __init__(self, out: Path, rank: int, tensorboard: str | os.PathLike | None = None) -> None:
        """``tensorboard``: a directory for event files (ValueError with the install line where the package is
        missing: checked now, opened by :meth:`open`)."""
        self.out, self.rank, self.tensorboard_dir = out, rank, tensorboard
        self.tensorboard: Any = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (checked now, opened when training)
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None

    def open(self) -> None:
        """Start the TensorBoard writer (where one was asked for), as training starts."""
        if self.tensorboard_dir is not None and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.tensorboard_dir))

    def close(self) -> None:
        """Close the TensorBoard writer, if open."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def say(self, line: str, terminal: bool) -> None:
        """Append ``line`` to ``train.log``, and print it to stderr where ``terminal`` (above the progress bar, if
        one is drawn)."""
        if self.rank != 0:
            return
        if terminal:
            tqdm.write(line, file=sys.stderr)
            sys.stderr.flush()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG_FILE, "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def training_scalars(self, loss: float, samples_per_s: float, step: int) -> None:
        """The logged training loss and throughput, to TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", loss, step)
            self.tensorboard.add_scalar("train/samples_per_s", samples_per_s, step)

    def record(self, result: dict[str, Any]) -> None:
        """Append an evaluation to ``metrics.jsonl`` (and its metrics to TensorBoard)."""
        if self.rank != 0:  # every rank has the result; rank 0 writes it
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a") as log:
            log.write(json.dumps(result) + "\n")
        if self.tensorboard is not None:
            split = result["split"]
            for key in ("bce", "auc", "gap_to_bayes"):
                if result.get(key) is not None:
                    self.tensorboard.add_scalar(f"{split}/{key}", result[key], result["step"])
            self.tensorboard.add_scalar("train/loss", result["train_loss"], result["step"])
            self.tensorboard.flush()

    def forget_after(self, step: int) -> None:
        """On resume: drop the records after the checkpoint's ``step`` (a kill between an evaluation's record and
        its checkpoint left one; the resumed run evaluates that step again and records it once). A last line cut
        by the kill is dropped too; any other line that is not a record is refused (CheckpointError)."""
        path = self.out / METRICS_FILE
        if self.rank != 0 or not path.is_file():
            return
        text = path.read_text()
        lines, kept = text.splitlines(), []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                if number == len(lines) and not text.endswith("\n"):  # the append the kill interrupted
                    continue
                raise CheckpointError(
                    f"{path}:{number}: not an evaluation record (a JSON object with a step): the "
                    f"file was edited or damaged; remove that line to resume"
                )
            if record["step"] <= step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def last_record(self, step: int) -> dict[str, Any] | None:
        """The last evaluation in ``metrics.jsonl``, if it is of ``step``."""
        try:
            lines = (self.out / METRICS_FILE).read_text().splitlines()
            last = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            return None
        return last if isinstance(last, dict) and last.get("step") == step else None


def evaluation_line(result: dict[str, Any], total_steps: int, steps_per_epoch: int, best: dict[str, Any] | None) -> str:
    """One evaluation as a person reads it, with the best so far (the checkpoint ``best`` holds)."""
    line = (
        f"eval {result['split']} at step {result['step']:,}/{total_steps:,} (epoch "
        f"{result['step'] / steps_per_epoch:.2f}): BCE {result['bce']:.4f}"
    )
    if result.get("gap_to_bayes") is not None:
        line += f" ({result['gap_to_bayes']:+.2%} from Bayes)"
    line += f", AUC {result['auc']:.4f}"
    if best is not None:
        line += f"; best BCE {best['bce']:.4f} at step {best['step']:,}"
    return line
