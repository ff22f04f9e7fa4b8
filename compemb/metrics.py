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


class BinnedAUC:
    """ROC AUC of a stream of scores in [0, 1], in bounded memory: positives and negatives counted in ``bins``
    equal bins, pairs inside one bin counting half (as ties). Its error is at most half the share of
    positive-negative pairs that fall in one bin (:attr:`error_bound`): with 2^20 bins, scores closer than 1e-6.
    """

    def __init__(self, bins: int = 1 << 20) -> None:
        self.bins = bins
        self.positives = np.zeros(bins, np.int64)
        self.negatives = np.zeros(bins, np.int64)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Count scores (1-D, in [0, 1]) with their 0/1 labels."""
        scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
        if scores.shape != labels.shape or scores.ndim != 1:
            raise ValueError(f"scores and labels must be 1-D of one length, got {scores.shape} and {labels.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be 0 or 1")
        if len(scores) and not (np.nanmin(scores) >= 0 and np.nanmax(scores) <= 1 and not np.isnan(scores).any()):
            raise ValueError("scores must be probabilities in [0, 1]")
        bin_of = np.minimum((scores * self.bins).astype(np.int64), self.bins - 1)
        positive = labels == 1
        self.positives += np.bincount(bin_of[positive], minlength=self.bins)
        self.negatives += np.bincount(bin_of[~positive], minlength=self.bins)

    @property
    def has_both_classes(self) -> bool:
        """Whether a positive and a negative have been counted (AUC is undefined otherwise)."""
        return bool(self.positives.any() and self.negatives.any())

    def value(self) -> float:
        """The AUC of everything counted; ValueError where a class is missing."""
        positives, negatives = int(self.positives.sum()), int(self.negatives.sum())
        if not positives or not negatives:
            raise ValueError(f"AUC needs both classes; got {positives} positives and {negatives} negatives")
        below = np.cumsum(self.negatives) - self.negatives  # negatives in lower bins
        wins = np.sum(self.positives * (below + 0.5 * self.negatives), dtype=np.float64)
        return float(wins / positives / negatives)

    @property
    def error_bound(self) -> float:
        """The most the value can differ from the exact AUC: half the share of pairs sharing a bin."""
        pairs = float(self.positives.sum()) * float(self.negatives.sum())
        return float(np.sum(self.positives * self.negatives, dtype=np.float64) / 2 / pairs) if pairs else 0.0
