"""A CAFE table's sizes from a budget: which fields stay full, the hot rows and their sketch, the hashed rows per
level (where they lie: :mod:`compemb.embeddings.cafe.layout`).

:mod:`compemb.embeddings.cafe.embedding`'s module docstring states the rules; this module computes them, so the
classes read top to bottom without their arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from compemb.budget import FLOAT_BYTES, Budget, rows_for
from compemb.embeddings.fields import plan_fields
from compemb.hashing import coefficient_bytes
from compemb.sketch.hotsketch import SLOT_BYTES, HotSketch

SKETCH_SLOTS = 4  # slots per HotSketch bucket, as in the paper
OWNER_BYTES = 8 + 1  # per hot row: its owner id (int64) and whether it has one (bool)
MIN_HOT_ROWS = 16  # a table's default hot rows: at least this many, while they and their sketch fit in a quarter


@dataclass(frozen=True)
class CAFEPlan:
    """The sizes one CAFE table is built with."""

    hash_rate: float  # the hashed rows' share of the budget: as asked, or the default as the sizes left it
    hot_rows: int
    sketch_buckets: int
    hashed_rows: tuple[int, ...]  # per level
    smallest_bytes: int  # the smallest budget this layout can be built in


def table_fields(
    blocks: Sequence[int] | None,
    num_embeddings: int | None,
    embedding_dim: int,
    ratio: float | None,
    budget_bytes: int,
    field_tables: bool,
    who: str,
) -> list[tuple[int, bool]]:
    """``(ids, kept full)`` per field: one field without ``blocks``; with them the authors' rule (a field of n <=
    400 / (1 + log2(ratio)) ids stays full), smallest first while the full fields take at most half the budget
    (the authors' rule alone can spend all of a small set's budget on them); the largest field is always
    compressed."""
    if blocks is None:
        return [(num_embeddings or 0, False)]
    sizes = [int(n) for n in blocks]
    if num_embeddings is None or sum(sizes) != num_embeddings or min(sizes, default=0) < 1:
        raise ValueError(
            f"{who}: blocks must be positive field sizes summing to num_embeddings={num_embeddings}, "
            f"got {list(blocks)!r}"
        )
    if not field_tables:  # one hashed table for every field: none kept full
        return [(n, False) for n in sizes]
    return list(zip(sizes, plan_fields(sizes, embedding_dim, ratio, budget_bytes)))


def plan_tables(
    budget: Budget,
    embedding_dim: int,
    fields: list[tuple[int, bool]],
    *,
    levels: int,
    hash_rate: float,
    default_rate: bool,
    sketch_slots_per_row: float,
    merge_on_demote: bool,
    hash_split: float,
    field_tables: bool,
    one_vocabulary: bool,
) -> CAFEPlan:
    """Hot rows, sketch buckets and hashed rows per level for ``budget``: the fields kept full, hashes and field
    tables first, then hot rows and their sketch in ``1 - hash_rate`` of the rest, the hashed rows in what is left
    (``default_rate``: ``hash_rate`` is the default, which may move so that every table keeps its rows)."""
    d, num_fields = embedding_dim, len(fields)
    field_bytes = 0 if one_vocabulary else (num_fields + 1) * 8 + num_fields + 2 * levels * num_fields * 8
    full_ids = sum(n for n, full in fields if full)
    row_bytes = d * FLOAT_BYTES * (2 if merge_on_demote else 1) + OWNER_BYTES  # + its start value
    hash_bytes = coefficient_bytes(levels)
    sketch_fixed = HotSketch.bytes_for(0)
    fixed = hash_bytes + field_bytes + full_ids * d * FLOAT_BYTES
    # every hashed table needs a row per level (cafe-ml's second level holds 1 - hash_split of the hashed rows)
    tables = sum(not full for _, full in fields) if field_tables else 1
    least_hashed = tables if levels == 1 else math.ceil(tables / min(hash_split, 1 - hash_split))
    if default_rate:  # the default rate leaves every hashed table at least one row per level
        needed = (least_hashed + 1) * d * FLOAT_BYTES / max(1, budget.num_bytes - fixed)
        hash_rate = max(hash_rate, min(needed, 0.99))
    # hot rows and the sketch share (1 - hash_rate) of the budget (after the fields kept full), sized together
    per_row = row_bytes + sketch_slots_per_row * SLOT_BYTES
    hot_rows = max(1, int(((1 - hash_rate) * (budget.num_bytes - fixed) - sketch_fixed) // per_row))
    if default_rate:  # a small table keeps a sketch worth the name (C26 at 100x: 1 hot row before)
        least = min(MIN_HOT_ROWS, int((budget.num_bytes - fixed) / 4 // per_row))
        if least > hot_rows:  # hash_rate is then the share the hashed rows are left
            hot_rows = least
            hash_rate = 1 - (hot_rows * per_row + sketch_fixed) / (budget.num_bytes - fixed)
    buckets = max(1, math.ceil(hot_rows * sketch_slots_per_row / SKETCH_SLOTS))
    reserved = hot_rows * row_bytes + HotSketch.bytes_for(buckets) + fixed
    # the hashed tables take the rest, so the total lands within half a row of the budget
    hashed = rows_for(budget, d, reserved)
    first = hashed if levels == 1 else max(1, min(hashed - 1, round(hashed * hash_split)))
    hashed_rows = (first,) if levels == 1 else (first, max(1, hashed - first))
    smallest = row_bytes + HotSketch.bytes_for(1) + fixed + max(levels, least_hashed) * d * FLOAT_BYTES
    return CAFEPlan(hash_rate, hot_rows, buckets, hashed_rows, smallest)
