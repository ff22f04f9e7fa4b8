"""Budgets and memory reports.

A budget is given as ``compression=R`` (the full fp32 table's bytes divided by R) or as
``num_params=P`` (P fp32 values' worth of bytes). Every method turns the budget into its own sizes
and reports what it really stores with :class:`MemoryReport`: trainable floats, integer index
arrays (pointers, hash coefficients), sketch state, and the total. A method whose total would miss
the budget by more than :data:`BUDGET_TOLERANCE` raises :class:`BudgetError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOAT_BYTES = 4  # the budget is counted in fp32 values
BUDGET_TOLERANCE = 0.01


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
    num_embeddings: int | None,
    embedding_dim: int,
    *,
    compression: float | None = None,
    num_params: int | None = None,
) -> Budget:
    """Turn ``compression=R`` or ``num_params=P`` (exactly one) into a :class:`Budget`.

    Raises:
        ValueError: neither or both given, a non-positive value, or ``compression`` without
            ``num_embeddings`` (an open vocabulary has no full table to divide).
    """
    if (compression is None) == (num_params is None):
        raise ValueError("give exactly one budget: compression=R or num_params=P")
    if compression is not None:
        if not (isinstance(compression, (int, float)) and math.isfinite(compression) and compression > 0):
            raise ValueError(f"compression must be a positive number, got {compression!r}")
        if num_embeddings is None:
            raise ValueError("compression=R needs num_embeddings; with an open vocabulary give num_params=P")
        return Budget(round(full_table_bytes(num_embeddings, embedding_dim) / compression))
    if not isinstance(num_params, int) or isinstance(num_params, bool) or num_params <= 0:
        raise ValueError(f"num_params must be a positive int, got {num_params!r}")
    return Budget(num_params * FLOAT_BYTES)


def check_budget(method: str, report: MemoryReport, budget: Budget, smallest_params: int) -> None:
    """Raise :class:`BudgetError` if ``report.total`` misses ``budget`` by more than 1%.

    ``smallest_params`` is the smallest budget (in fp32 values) the method can meet with these
    options; the error names it so the caller knows what to ask for instead.
    """
    error = abs(report.total - budget.num_bytes) / budget.num_bytes
    if error <= BUDGET_TOLERANCE:
        return
    asked = f"{budget.num_params:,.0f} params ({budget.num_bytes:,} bytes)"
    if budget.num_params < smallest_params:
        raise BudgetError(
            f"{method} cannot meet a budget of {asked}: the smallest budget it can meet is "
            f"{smallest_params:,} params"
        )
    raise BudgetError(
        f"{method} cannot meet a budget of {asked} within {BUDGET_TOLERANCE:.0%}: its nearest size stores "
        f"{report.total:,} bytes; the smallest budget it can meet is {smallest_params:,} params"
    )


def smallest_meetable(step_floats: int, reserved_bytes: int = 0, structural_floats: int = 1) -> int:
    """The smallest budget (fp32 values) from which every budget is met within 1%.

    A method whose size moves in steps of ``step_floats`` misses a budget by up to half a step, so it needs
    budgets of at least ``step / (2 * tolerance)``; never less than its ``structural_floats`` minimum.
    """
    granular = math.ceil(step_floats / (2 * BUDGET_TOLERANCE))
    return max(granular, structural_floats) + math.ceil(reserved_bytes / FLOAT_BYTES)


def rows_for(budget: Budget, floats_per_row: int, reserved_bytes: int = 0) -> int:
    """How many rows of ``floats_per_row`` fp32 values fit the budget after ``reserved_bytes`` (at least 1)."""
    return max(1, round((budget.num_bytes - reserved_bytes) / (floats_per_row * FLOAT_BYTES)))
