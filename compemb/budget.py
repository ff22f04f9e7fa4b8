"""Budgets and memory reports.

A budget is given as ``compression=R`` (the full fp32 table's bytes divided by R) or as
``num_params=P`` (P fp32 values' worth of bytes). Every method turns the budget into its own sizes
and reports what it really stores with :class:`MemoryReport`: trainable floats, integer index
arrays (pointers, hash coefficients), sketch state, and the total. A method whose total would miss
the budget by more than :data:`BUDGET_TOLERANCE` raises :class:`BudgetError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import operator
from collections.abc import Iterator
from dataclasses import dataclass

FLOAT_BYTES = 4  # the budget is counted in fp32 values
BUDGET_TOLERANCE = 0.01


_tolerance: contextvars.ContextVar[float] = contextvars.ContextVar("budget_tolerance", default=BUDGET_TOLERANCE)


@contextlib.contextmanager
def nearest_size() -> Iterator[None]:
    """Inside this block methods build their size nearest the budget instead of refusing to miss it by >1%.

    For callers that account the real bytes themselves, as EmbeddingCollection does for small features.
    """
    token = _tolerance.set(math.inf)
    try:
        yield
    finally:
        _tolerance.reset(token)


def budget_tolerance() -> float:
    """How far a method may miss its budget now: 1%, or infinite inside :func:`nearest_size`."""
    return _tolerance.get()


class BudgetError(ValueError):
    """A method cannot meet the budget it was given; the message names what it can meet."""


@dataclass(frozen=True)
class MemoryReport:
    """Bytes a compressed embedding stores, by kind."""

    float_bytes: int
    index_bytes: int = 0
    sketch_bytes: int = 0

    @property
    def total(self) -> int:
        """All bytes together: what the budget is compared with."""
        return self.float_bytes + self.index_bytes + self.sketch_bytes

    def compression(self, num_embeddings: int, embedding_dim: int) -> float:
        """The compression reached: full fp32 table bytes / total bytes."""
        return full_table_bytes(num_embeddings, embedding_dim) / self.total

    def __add__(self, other: MemoryReport) -> MemoryReport:
        return MemoryReport(
            self.float_bytes + other.float_bytes,
            self.index_bytes + other.index_bytes,
            self.sketch_bytes + other.sketch_bytes,
        )


@dataclass(frozen=True)
class Budget:
    """A resolved budget: the bytes a method may store, and the same in fp32 values."""

    num_bytes: int

    @property
    def num_params(self) -> float:
        """The budget in fp32 values (may be fractional when given as a compression ratio)."""
        return self.num_bytes / FLOAT_BYTES


def full_table_bytes(num_embeddings: int, embedding_dim: int) -> int:
    """Bytes of the uncompressed fp32 table."""
    return num_embeddings * embedding_dim * FLOAT_BYTES


def resolve_budget(
    num_embeddings: int | None, embedding_dim: int, *, compression: float | None = None, num_params: int | None = None
) -> Budget:
    """Turn ``compression=R`` or ``num_params=P`` (exactly one) into a :class:`Budget`.

    Raises:
        ValueError: neither or both given, a non-positive value, a budget under one float, or ``compression``
            without ``num_embeddings`` (an open vocabulary has no full table to divide).
    """
    if (compression is None) == (num_params is None):
        raise ValueError("give exactly one budget: compression=R or num_params=P")
    if compression is not None:
        if not (isinstance(compression, numbers.Real) and math.isfinite(compression) and compression > 0):
            raise ValueError(f"compression must be a positive number, got {compression!r}")
        if compression < 1:  # more bytes than the full table: no method compresses that, it would train full tables
            raise ValueError(
                f"compression must be >= 1 (full table bytes / stored bytes; 1 is the full table), got {compression:g}"
            )
        if num_embeddings is None:
            raise ValueError("compression=R needs num_embeddings; with an open vocabulary give num_params=P")
        budget = Budget(round(full_table_bytes(num_embeddings, embedding_dim) / float(compression)))
        if budget.num_bytes < FLOAT_BYTES:
            raise ValueError(
                f"compression {compression:g} of a {num_embeddings} x {embedding_dim} table leaves less than one float"
            )
        return budget
    if isinstance(num_params, bool) or not isinstance(num_params, numbers.Integral) or num_params <= 0:
        raise ValueError(f"num_params must be a positive int, got {num_params!r}")
    return Budget(operator.index(num_params) * FLOAT_BYTES)


def check_budget(
    method: str,
    report: MemoryReport,
    budget: Budget,
    smallest_params: int,
    every_budget_from: int | None = None,
    largest_params: int | None = None,
) -> None:
    """Raise :class:`BudgetError` if ``report.total`` misses ``budget`` by more than 1%.

    The error names what the method can meet: ``smallest_params``, the smallest budget (fp32 values) it can
    meet; ``every_budget_from``, the size from which it meets every budget (sizes that move in steps can
    miss budgets between the two); ``largest_params``, the largest it can meet, if it has one.
    """
    error = abs(report.total - budget.num_bytes) / budget.num_bytes
    if error <= _tolerance.get():
        return
    asked = f"{method} cannot meet a budget of {budget.num_params:,.0f} params ({budget.num_bytes:,} bytes)"
    if budget.num_params < smallest_params:
        raise BudgetError(f"{asked}: the smallest budget it can meet is {smallest_params:,} params")
    if largest_params is not None and budget.num_params > largest_params:
        raise BudgetError(f"{asked}: the largest budget it can meet is {largest_params:,} params")
    every = f"; it meets every budget from {every_budget_from:,} params up" if every_budget_from else ""
    raise BudgetError(
        f"{asked} within {BUDGET_TOLERANCE:.0%}: its nearest size stores {report.total:,} bytes; the smallest "
        f"budget it can meet is {smallest_params:,} params{every}"
    )


def every_budget_from(step_floats: int, reserved_bytes: int = 0, smallest_floats: int = 1) -> int:
    """The budget (fp32 values) from which a method whose size moves in steps of ``step_floats`` meets every budget.

    A size that moves in steps misses a budget by up to half a step, so budgets of at least
    ``step / (2 * tolerance)`` floats are always met within the tolerance; never below ``smallest_floats``.
    """
    granular = math.ceil(step_floats / (2 * BUDGET_TOLERANCE))
    return max(granular, smallest_floats) + math.ceil(reserved_bytes / FLOAT_BYTES)


def rows_for(budget: Budget, floats_per_row: int, reserved_bytes: int = 0) -> int:
    """How many rows of ``floats_per_row`` fp32 values fit the budget after ``reserved_bytes`` (at least 1)."""
    return max(1, round((budget.num_bytes - reserved_bytes) / (floats_per_row * FLOAT_BYTES)))
