"""Popularity that drifts along a stream, with ids that arrive: one feature's id distribution at each position t.

A synthetic set's splits are one stream in time (train, then val, then test; t from 0 to 1). A feature of n ids
drifts between two popularity orders, both Zipf laws over ranks:

- the **start order** ranks the ids present from the start (all but the arriving ones);
- the **end order** ranks every id. It is the start order with the arriving ids inserted at uniformly random
  ranks, and then ``R = ceil(drift x m)`` of the start's top ``m`` ids (``m`` = its top 1%, at least one id)
  swapped with ids from outside that top: arriving ids first, else ids of the start's tail. So every feature drifts
  when ``drift > 0`` (a 3-id feature too: its top id changes), and by the end at least a share ``drift`` of the
  start's top 1% has left the top 1%.

At position t a row draws from the start order with probability ``1 - t`` and from the end order with probability
``t``, so an id's traffic moves linearly from its start share to its end share (no conveyor: the most popular id
of a feature fades over the whole stream). **Arriving ids**: ``round(new_ids x n)`` of every feature's ids (at least
one where ``new_ids > 0`` and the feature has two ids or more) have an arrival position, uniform in [0, 1]; before
it an id is never drawn (a draw of it from the end order is drawn again from the start order). Those arriving after
the train split ends are never seen in training; the data set's manifest counts, per split, the share of rows whose
ids training never saw. The teacher does not change, so every row's true probability, and each split's Bayes
limits, are exact.
"""

from __future__ import annotations

import math

import numpy as np


class FeatureDrift:
    """One feature's start order, end order and arrival positions (see the module)."""

    def __init__(
        self, n: int, zipf: float, drift: float, new_ids: float, start_ids: np.ndarray, generator: np.random.Generator
    ) -> None:
        self.n = n
        arriving = max(1, round(new_ids * n)) if new_ids > 0 and n >= 2 else 0
        arriving = min(arriving, n - 1)  # one id at least is there from the start
        is_new = np.zeros(n, dtype=bool)
        is_new[generator.choice(n, arriving, replace=False)] = True
        self.arrival = np.where(is_new, generator.random(n), 0.0)  # 0: present from the start
        # the start order: the planted popularity order with the arriving ids left out
        self.start_order = start_ids[~is_new[start_ids]]
        self.start_cumulative = _zipf_cumulative(len(self.start_order), zipf)
        # the end order: arriving ids inserted at uniformly random ranks (a random interleaving), then R of the
        # start's top m swapped with ids from outside it (arriving ones first)
        order = np.empty(n, dtype=np.int64)
        slots = np.zeros(n, dtype=bool)
        slots[generator.choice(n, arriving, replace=False)] = True
        order[slots] = generator.permutation(np.flatnonzero(is_new))
        order[~slots] = self.start_order
        self.top = max(1, math.ceil(0.01 * len(self.start_order)))
        start_top = self.start_order[: self.top]
        # swapped: start-top ids still in the end's top m, with ids below it (so each one leaves the top m)
        staying = order[: self.top][np.isin(order[: self.top], start_top)]
        outside = order[self.top :][~np.isin(order[self.top :], start_top)]
        newcomers, tail = outside[is_new[outside]], outside[~is_new[outside]]
        leaving = min(math.ceil(drift * self.top) if drift > 0 else 0, len(staying), len(outside))
        replacements = np.concatenate([generator.permutation(newcomers), generator.permutation(tail)])[:leaving]
        old = generator.choice(staying, leaving, replace=False)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        order[rank[old]], order[rank[replacements]] = replacements, old
        self.end_order = order
        self.end_cumulative = _zipf_cumulative(n, zipf)

    def replaced_share(self) -> float:
        """The share of the start's top 1% (``m`` ids) that is not in the end's top ``m``."""
        return (self.top - len(np.intersect1d(self.start_order[: self.top], self.end_order[: self.top]))) / self.top

    def sample(self, generator: np.random.Generator, positions: np.ndarray) -> np.ndarray:
        """One id per row at stream ``positions`` (0 to 1)."""
        start = self.start_order[_draw_ranks(generator, self.start_cumulative, len(positions))]
        end = self.end_order[_draw_ranks(generator, self.end_cumulative, len(positions))]
        # from the end order with probability t, unless that id has not arrived yet
        use_end = (generator.random(len(positions)) < positions) & (self.arrival[end] <= positions)
        return np.where(use_end, end, start)


def _zipf_cumulative(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return np.cumsum(weights) / weights.sum()


def _draw_ranks(generator: np.random.Generator, cumulative: np.ndarray, rows: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cumulative, generator.random(rows), side="right"), len(cumulative) - 1)
