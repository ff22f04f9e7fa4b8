"""Evaluation metrics: binary cross-entropy (log loss) and exact ROC AUC."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def bce(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of click ``logits`` against 0/1 ``labels`` (natural log)."""
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def auc(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """Exact ROC AUC: the probability a random positive outscores a random negative, ties counting half.

    Computed from average ranks (the Mann-Whitney U statistic) in O(n log n).

    Raises:
        ValueError: the labels are not all 0/1, or one class is missing (AUC is then undefined).
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of one length, got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUC needs both classes; got {positives} positives and {negatives} negatives")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average rank (1-based) of every run of tied scores
    run_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_ends = np.r_[run_starts[1:], scores.size]
    run_ranks = (run_starts + run_ends + 1) / 2.0
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(run_ranks, run_ends - run_starts)
    positive_rank_sum = ranks[labels == 1].sum()
    return float((positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives))
