"""When CCE clusters (:class:`ClusterSchedule`), which ids a clustering runs on and hands pointers to
(:func:`cluster_sample`, :func:`top_holders`), and what one clustering did (:class:`ClusterReport`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from compemb.sketch.hotsketch import HotSketch

# the automatic schedule clusters at least every 1/AUTO_PER_RUN of a run (twice up to 3/4 of a one-epoch run): of
# every 1/12, 1/6 and 1/3 of a one-epoch run (benchmarks/results/cce_schedule.md) the fewest clusterings did best
AUTO_PER_RUN = 3
AUTO_WITHOUT_TOTAL = 1000  # ... and every this many steps when the run's length is not known


@dataclass(frozen=True)
class ClusterSchedule:
    """When the trainer clusters: after every ``every`` steps, up to ``until`` x the run's total steps.

    ``every=None`` (the default) derives the interval from the run, as the paper clusters after each epoch until
    3/4 of training: every epoch, but at least every ``1/AUTO_PER_RUN`` of the run, so a one-epoch run clusters
    at 1/3 and 2/3 of it and a run of three epochs or more after each epoch (:meth:`interval`). ``every=0`` never clusters (call
    :meth:`CCEmbedding.cluster` yourself). Without a known total (a loop that never calls ``on_train_begin``)
    ``until`` is not applied and ``None`` means every ``AUTO_WITHOUT_TOTAL`` steps.

    Example::

        >>> [s for s in range(1000) if ClusterSchedule(every=200, until=0.75).due(s, total_steps=1000)]
        [199, 399, 599]
        >>> [s + 1 for s in range(1200) if ClusterSchedule().due(s, total_steps=1200)]  # one epoch of 1,200 steps
        [400, 800]
        >>> ClusterSchedule().interval(total_steps=10_000, steps_per_epoch=1_000)  # ten epochs: after each
        1000
    """

    every: int | None = None
    until: float = 0.75

    def __post_init__(self) -> None:
        if self.every is not None and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0
        ):
            raise ValueError(f"cluster_every must be an int >= 0 or None (automatic), got {self.every!r}")
        if not 0 < self.until <= 1:
            raise ValueError(f"cluster_until must be in (0, 1], got {self.until!r}")

    def interval(self, total_steps: int | None = None, steps_per_epoch: int | None = None) -> int:
        """Steps between clusterings (0: never) for a run of ``total_steps`` with epochs of ``steps_per_epoch``."""
        if self.every is not None:
            return self.every
        if total_steps is None:
            return AUTO_WITHOUT_TOTAL
        per_run = max(1, math.ceil(total_steps / AUTO_PER_RUN))
        return per_run if steps_per_epoch is None else max(1, min(steps_per_epoch, per_run))

    def due(self, step: int, total_steps: int | None = None, steps_per_epoch: int | None = None) -> bool:
        """Whether to cluster after 0-based ``step`` (that is, once ``step + 1`` steps are done)."""
        done, every = step + 1, self.interval(total_steps, steps_per_epoch)
        if every == 0 or done % every:
            return False
        return total_steps is None or done <= self.until * total_steps

    def over(self, step: int, total_steps: int | None = None, steps_per_epoch: int | None = None) -> bool:
        """Whether no clustering is due after ``step`` any more (never without a schedule or a known total)."""
        every = self.interval(total_steps, steps_per_epoch)
        following = ((step + 1) // every + 1) * every if every else 0  # the next due step count
        return every > 0 and total_steps is not None and following > self.until * total_steps


@dataclass(frozen=True)
class ClusterReport:
    """What one :meth:`CCEmbedding.cluster` call did."""

    round: int  # 1 for the first clustering
    sample_ids: Tensor  # the ids k-means ran on (sorted, int64, CPU)
    inertia: tuple[float, ...]  # per column: sum of squared distances of the sample to its nearest centroid
    num_pointers: int  # ids now holding stored pointers
    seconds: float


def cluster_sample(
    sample: str,
    num_embeddings: int,
    limit: int,
    generator: torch.Generator,
    seen: Tensor | None = None,
    sketch: HotSketch | None = None,
) -> Tensor:
    """At most ``limit`` distinct ids to run k-means on, sorted: ``"seen"`` ids of the bitmap, ``"frequency"``
    sketch items drawn by score, else (or when nothing is recorded yet) ``"uniform"`` over the vocabulary."""
    n = num_embeddings
    ids = torch.empty(0, dtype=torch.int64)
    if sample == "seen" and seen is not None:
        bits = (seen.cpu().unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
        ids = bits.view(-1).nonzero().squeeze(-1)
        ids = ids[ids < n]
        if ids.numel() > limit:
            ids = ids[torch.randperm(ids.numel(), generator=generator)[:limit]]
    elif sample == "frequency" and sketch is not None:
        ids, scores = (t.cpu() for t in sketch.items()[:2])  # the sketch may live on an accelerator
        ids, scores = ids[scores > 0], scores[scores > 0]
        if ids.numel() > limit:
            ids = ids[torch.multinomial(scores.double(), limit, replacement=False, generator=generator)]
    if ids.numel() == 0:  # uniform, or nothing recorded yet
        if n <= limit:
            ids = torch.arange(n)
        else:  # distinct ids without an n-long permutation (10M ids would take 80 MB)
            ids = torch.empty(0, dtype=torch.int64)
            while ids.numel() < limit:
                ids = torch.unique(torch.cat([ids, torch.randint(n, (limit + limit // 4,), generator=generator)]))
            ids = ids[torch.randperm(ids.numel(), generator=generator)[:limit]]
    return torch.sort(ids).values


def top_holders(sketch: HotSketch, count: int) -> Tensor:
    """The ``count`` ids of highest sketch score (ties to the smaller id), sorted: who holds stored pointers."""
    ids, scores = (t.cpu() for t in sketch.items()[:2])
    by_id = torch.argsort(ids, stable=True)
    order = by_id[torch.argsort(scores[by_id], descending=True, stable=True)]
    return torch.sort(ids[order[:count]]).values  # sorted: holder_ids is searched
