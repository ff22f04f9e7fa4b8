"""What preprocessing makes of a good row's values: the dense transform, and the vocabulary that maps each
categorical value to an id (every feature's values counted, then the frequent ones kept)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from safetensors.numpy import save as save_arrays

from compemb.data.criteo.rows import MISSING
from compemb.data.dataset.format import VOCABULARY_FILE
from compemb.io import atomic_write_bytes

MISSING_ID, RARE_ID = 0, 1  # categorify: the ids every feature reserves


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """Criteo's dense transform: negatives -> 0, then log(x + 1), as float32."""
    return np.log1p(np.maximum(raw, 0)).astype(np.float32)


class ValueCounts:
    """Occurrences of every value of one feature, counted chunk by chunk with sorts (no Python dict per value)."""

    def __init__(self) -> None:
        self.values = np.empty(0, np.int64)
        self.counts = np.empty(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, column: np.ndarray) -> None:
        """Count one chunk of values."""
        values, counts = np.unique(column, return_counts=True)
        self._pending.append((values, counts))
        self._pending_size += len(values)
        if self._pending_size > max(len(self.values), 1 << 20):  # merge rarely: amortised O(n log n)
            self._merge()

    def add_counted(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Add distinct values already counted elsewhere (another process's :meth:`result`)."""
        self._pending.append((values, counts))
        self._pending_size += len(values)
        if self._pending_size > max(len(self.values), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        values = np.concatenate([self.values, *(v for v, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self.values, inverse = np.unique(values, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=len(self.values)).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct values and their counts."""
        self._merge()
        return self.values, self.counts


VOCABULARY = VOCABULARY_FILE  # a categorified data set's kept values, one sorted int64 array per feature


class Categorifier:
    """Maps each feature's raw values to ids: 0 missing, 1 rare (seen < min_count), then kept values in order."""

    def __init__(self, counts: list[ValueCounts], min_count: int) -> None:
        self.kept = []
        for feature in counts:
            values, value_counts = feature.result()
            self.kept.append(values[(value_counts >= min_count) & (values != MISSING)])

    @classmethod
    def from_kept(cls, kept: Sequence[np.ndarray]) -> Categorifier:
        """The categorifier of a saved vocabulary: each feature's kept values, sorted."""
        categorifier = cls([], 0)
        categorifier.kept = [np.asarray(values, dtype=np.int64) for values in kept]
        return categorifier

    def save(self, path: str | os.PathLike) -> None:
        """Write the kept values (``C1`` ... ``C26``, int64) as safetensors, so ids can be mapped again later."""
        atomic_write_bytes(path, save_arrays({f"C{i + 1}": kept for i, kept in enumerate(self.kept)}))

    @property
    def cardinalities(self) -> list[int]:
        """Ids per feature, the two reserved ones included."""
        return [len(kept) + 2 for kept in self.kept]

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Raw values ``(n, 26)`` -> ids ``(n, 26)``."""
        ids = np.empty_like(raw)
        for column, kept in enumerate(self.kept):
            values = raw[:, column]
            position = np.searchsorted(kept, values).clip(max=max(len(kept) - 1, 0))
            found = kept[position] == values if len(kept) else np.zeros(len(values), bool)
            ids[:, column] = np.where(found, position + 2, np.where(values == MISSING, MISSING_ID, RARE_ID))
        return ids
