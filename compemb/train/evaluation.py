"""Evaluation: a model's BCE and exact AUC on a split, and the gap to the Bayes BCE where the data set knows it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from compemb import distributed
from compemb.data.dataset import Split
from compemb.metrics import auc, bce
from compemb.train.batches import read_rows, unpack_batch


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    data: Split,
    bags: list[dict[str, Any]],
    batch_size: int,
    to_device: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]],
) -> dict[str, float]:
    """``{"bce": ..., "auc": ...}`` of ``model`` on ``data`` (labelled), read ``batch_size`` rows at a time; under
    torchrun each rank scores its part and every rank gets the metrics of all rows."""
    model.eval()
    low, high = distributed.shard(0, len(data))  # under torchrun each rank scores its part; all see every logit
    logits = distributed.gather_rows(
        torch.cat(
            [  # one (possibly empty) batch at least: cat needs one
                logits_of(model, to_device(read_rows(data, slice(start, min(start + batch_size, high)))), bags)
                for start in range(low, max(high, low + 1), batch_size)
            ]
        )
    ).cpu()
    model.train()
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.float32))
    return {"bce": bce(logits, labels), "auc": auc(logits, labels)}


def logits_of(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], bags: list[dict[str, Any]]) -> torch.Tensor:
    """The model's logits for a batch of :func:`read_rows` tensors (on the model's device)."""
    dense, sparse, _, bagged = unpack_batch(batch, bags)
    return model(dense, sparse, bagged)


def gap_to_bayes(bce_value: float, manifest: dict[str, Any], split: str) -> dict[str, float]:
    """``{"bayes_bce", "gap_to_bayes"}`` where the data set's manifest records the split's Bayes BCE (synthetic
    data), else nothing."""
    bayes = manifest.get("bayes", {}).get(split)
    if not bayes:
        return {}
    return {"bayes_bce": bayes["bce"], "gap_to_bayes": bce_value / bayes["bce"] - 1}
