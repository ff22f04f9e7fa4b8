"""When CCE clusters (:class:`ClusterSchedule`) and what one clustering did (:class:`ClusterReport`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ClusterSchedule:
    """When the trainer clusters: after every ``every`` steps, up to ``until`` x the run's total steps.

    ``every=0`` never clusters (call :meth:`CCEmbedding.cluster` yourself). Without a known total (a loop that
    never calls ``on_train_begin``) ``until`` is not applied.

    Example::

        >>> [s for s in range(1000) if ClusterSchedule(every=200, until=0.75).due(s, total_steps=1000)]
        [199, 399, 599]
    """

    every: int = 0
    until: float = 0.75

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"cluster_every must be an int >= 0, got {self.every!r}")
        if not 0 < self.until <= 1:
            raise ValueError(f"cluster_until must be in (0, 1], got {self.until!r}")

    def due(self, step: int, total_steps: int | None = None) -> bool:
        """Whether to cluster after 0-based ``step`` (that is, once ``step + 1`` steps are done)."""
        done = step + 1
        if self.every == 0 or done % self.every:
            return False
        return total_steps is None or done <= self.until * total_steps

    def over(self, step: int, total_steps: int | None = None) -> bool:
        """Whether no clustering is due after ``step`` any more (never without a schedule or a known total)."""
        following = ((step + 1) // self.every + 1) * self.every if self.every else 0  # the next due step count
        return self.every > 0 and total_steps is not None and following > self.until * total_steps


@dataclass(frozen=True)
class ClusterReport:
    """What one :meth:`CCEmbedding.cluster` call did."""

    round: int  # 1 for the first clustering
    sample_ids: Tensor  # the ids k-means ran on (sorted, int64, CPU)
    inertia: tuple[float, ...]  # per column: sum of squared distances of the sample to its nearest centroid
    num_pointers: int  # ids now holding stored pointers
    seconds: float
