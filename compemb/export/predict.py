"""Scoring raw Criteo TSV with a model file: one click probability per input line, streamed in blocks."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compemb.data.criteo.rows import (
    MAX_LINE_BYTES,
    NUM_DENSE,
    NUM_SPARSE,
    Block,
    Rejections,
    open_binary,
    read_line,
    read_rows,
)
from compemb.export.load import ServedModel, load_model
from compemb.export.model_file import ModelFileError
from compemb.io import atomic_binary_writer
from compemb.metrics import BinnedAUC
from compemb.outputs import check_output_file


def has_label_column(input_path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> bool:
    """Whether a raw Criteo TSV's first line has a label column (1 + 13 + 26 = 40 fields; test.txt has 39).

    It reads at most ``max_line_bytes`` of each line: an input without newlines (``/dev/zero``) is refused."""
    with open_binary(Path(input_path)) as stream:
        number = 1
        while raw := read_line(stream, max_line_bytes, f"{input_path}:{number}"):
            number += 1
            line = raw.rstrip(b"\r\n")
            if line:
                fields = line.count(b"\t") + 1
                if fields == 1 + NUM_DENSE + NUM_SPARSE:
                    return True
                if fields == NUM_DENSE + NUM_SPARSE:
                    return False
                raise ModelFileError(
                    f"{input_path}: its first line has {fields} tab-separated fields; Criteo rows "
                    f"have 40 (label first) or 39 (no label)"
                )
    raise ModelFileError(f"{input_path} has no lines to score")


def predict_file(
    model_path: str | os.PathLike,
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    labeled: bool | None = None,
    max_memory: int | None = None,
    block_bytes: int = 1 << 25,
    max_line_bytes: int = MAX_LINE_BYTES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score every line of a raw Criteo TSV: one click probability per line in ``out`` (``nan`` for a rejected line,
    so line i of ``out`` is line i of the input; ``"-"``: standard output); return the counts of rows scored and rejected, by reason.

    ``labeled`` None: told by the first line's field count (:func:`has_label_column`). With labels the result
    also holds the scored rows' ``log_loss`` and ``auc`` (``labeled`` says which it was; AUC from
    :class:`compemb.metrics.BinnedAUC`). The input is streamed in blocks of ``block_bytes`` and scores are written
    as they come (``out`` appears whole when done), so memory stays bounded however long the input is; a line over
    ``max_line_bytes`` is refused. ``max_memory``: see :func:`load_model`. An ``out`` that exists is replaced only
    with ``overwrite`` (:func:`compemb.outputs.check_output_file`; never the input or the model)."""
    _check_paths(model_path, input_path, out, overwrite)
    served = load_model(model_path, max_memory=max_memory)
    _check_reads_raw_criteo(served, model_path)
    labeled = _label_column(input_path, labeled, max_line_bytes)
    tally = _Tally()
    # "-": the scores go to standard output as they come; any other path appears whole when done
    writer = contextlib.nullcontext(sys.stdout.buffer) if str(out) == "-" else atomic_binary_writer(out)
    with writer as written:
        for block in read_rows(
            input_path, labeled, tally.rejections, strict=False, block_bytes=block_bytes, max_line_bytes=max_line_bytes
        ):
            scores = tally.score(served, block, labeled)
            written.write("".join("nan\n" if np.isnan(score) else f"{score:.9f}\n" for score in scores).encode())
    return tally.result(labeled)


def _check_paths(
    model_path: str | os.PathLike, input_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool
) -> None:
    """ValueError for an input predict cannot read (standard input, a FIFO) or an ``out`` it may not write."""
    if str(input_path) == "-":
        raise ValueError(
            "predict reads a file (it looks at the first line before scoring): '-' (standard input) is "
            "not read; give the TSV's path (plain or gzip)"
        )
    if str(out) != "-":
        check_output_file(out, "scores", overwrite=overwrite, inputs=[("--input", input_path), ("--model", model_path)])
    if Path(input_path).is_fifo():  # the label probe would eat the stream's first bytes
        raise ValueError(
            f"--input {input_path} is a FIFO: predict reads its first line twice (to tell a label "
            f"column); give a file's path"
        )


def _check_reads_raw_criteo(served: ServedModel, model_path: str | os.PathLike) -> None:
    """ModelFileError for a model that cannot map raw Criteo rows (trained on other data, or on ids alone)."""
    if (
        served.header["ids"]["rule"] == "ids"
        or served.header["num_dense"] != NUM_DENSE
        or len(served.header["cardinalities"]) != NUM_SPARSE
    ):
        source = served.header["ids"].get("source") or "non-Criteo"
        raise ModelFileError(
            f"{model_path} was trained on {source} data: compemb predict reads raw Criteo TSV rows; "
            f"score preprocessed ids with compemb.export.load_model"
        )


def _label_column(input_path: str | os.PathLike, labeled: bool | None, max_line_bytes: int) -> bool:
    """Whether the input is read with a label column: ``labeled`` if given, else told by its first line."""
    detected = has_label_column(input_path, max_line_bytes)
    if labeled and not detected:  # every line would be rejected as one field short
        raise ValueError(
            f"{input_path}: scored as labelled (--labeled), but its first line has no label column "
            f"({NUM_DENSE + NUM_SPARSE} fields, not {1 + NUM_DENSE + NUM_SPARSE}): leave --labeled out"
        )
    return detected if labeled is None else labeled


@dataclass
class _Tally:
    """What scoring has counted so far: rows rejected, read and scored, and (labeled) the log loss and ranking."""

    rejections: Rejections = field(default_factory=Rejections)
    rows_read: int = 0
    scored: int = 0
    log_loss_sum: float = 0.0
    ranking: BinnedAUC = field(default_factory=BinnedAUC)

    def score(self, served: ServedModel, block: Block, labeled: bool) -> np.ndarray:
        """Every line's click probability in a block (``nan`` for a rejected line), counted into the tally."""
        scores = np.full(len(block.status), np.nan)
        if len(block.labels):
            dense, ids = served.encode(block.dense, block.sparse)
            with torch.inference_mode():  # scoring only: no autograd graph
                good = torch.sigmoid(served(dense, ids)).double().numpy()
            scores[block.status == 0] = good
            self.scored += len(block.labels)
            if labeled:
                truth, p = block.labels.astype(np.float64), np.clip(good, 1e-15, 1 - 1e-15)
                self.log_loss_sum -= float(np.sum(truth * np.log(p) + (1 - truth) * np.log1p(-p)))
                self.ranking.update(good, block.labels)
        self.rows_read += len(scores)
        return scores

    def result(self, labeled: bool) -> dict[str, Any]:
        """The counts of rows scored and rejected, by reason; with labels, the log loss and AUC of those scored."""
        result: dict[str, Any] = {
            "rows_read": self.rows_read,
            "rows_scored": self.scored,
            "rejected": self.rejections.total,
            "rejected_by_reason": dict(self.rejections.counts),
            "labeled": labeled,
        }
        if labeled and self.scored:
            result["log_loss"] = self.log_loss_sum / self.scored
            result["auc"] = self.ranking.value() if self.ranking.has_both_classes else float("nan")
        return result
