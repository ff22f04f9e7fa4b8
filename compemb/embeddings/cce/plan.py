"""CCE's sizes from a budget: table rows k, who holds stored pointers and in what dtype, sketch and bitmap.

:class:`~compemb.embeddings.cce.embedding.CCEmbedding`'s class docstring states the rule; this module computes it, so the
method reads top to bottom without its arithmetic. With honest accounting every byte but the float tables
(:func:`reserved_bytes`) is taken out of the budget first and the floats get the rest; with paper accounting the
floats alone are sized to the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compemb.budget import BUDGET_TOLERANCE, FLOAT_BYTES, Budget, BudgetError
from compemb.hashing import coefficient_bytes
from compemb.sketch.hotsketch import SLOT_BYTES, HotSketch

SKETCH_SLOTS = 4  # slots per HotSketch bucket
STATE_BYTES = 16  # the cluster_state buffer: (seed, rounds) as int64
ID_BYTES = 8  # a holder's id in holder_ids (int64)
# torch indexing takes int32/int64 only: pointers are stored in the smallest of these and widened per batch
POINTER_DTYPES = ((256, torch.uint8), (32_768, torch.int16), (2**31, torch.int32))


def pointer_dtype(rows: int) -> torch.dtype:
    """The smallest integer dtype holding every row index of a ``rows``-row table: uint8, int16 or int32."""
    return next(dtype for limit, dtype in POINTER_DTYPES if rows <= limit)


@dataclass(frozen=True)
class CCEPlan:
    """The sizes one CCE table is built with."""

    rows: int  # k
    holder_rows: int  # rows of each table for ids with stored pointers (centroids, residuals); k when all_ids
    all_ids: bool  # every id holds stored pointers (else the top ``pointers`` of the sketch)
    pointers: int  # rows of stored pointers
    dtype: torch.dtype
    sketch_buckets: int  # 0: no sketch
    bitmap_bytes: int  # 0: no seen-bitmap


@dataclass(frozen=True)
class CCEShape:
    """What the sizes depend on besides the budget: the table and the method's share options."""

    num_embeddings: int
    embedding_dim: int
    columns: int
    honest: bool  # accounting="honest"
    pointer_share: float
    holder_share: float
    sketch_slots_per_pointer: float
    hybrid: bool = False  # cce-hybrid: stored pointers for the sketch's top ids only (else for every id)


def fixed_bytes(columns: int) -> int:
    """The hashes h0 and h1 and the cluster state."""
    return 2 * coefficient_bytes(columns) + STATE_BYTES


def reserved_bytes(plan: CCEPlan, columns: int) -> int:
    """Every byte but the floats: hashes, pointers (and the holders' ids), sketch and bitmap."""
    sketch = HotSketch.bytes_for(plan.sketch_buckets) if plan.sketch_buckets else 0
    size = torch.empty(0, dtype=plan.dtype).element_size()
    per_pointer = columns * size + (0 if plan.all_ids else ID_BYTES)
    fixed = fixed_bytes(columns) + (0 if plan.all_ids else coefficient_bytes(columns))  # + cold1
    return fixed + plan.pointers * per_pointer + sketch + plan.bitmap_bytes


def smallest_bytes(columns: int, embedding_dim: int, bitmap_bytes: int) -> int:
    """One row per table, one stored pointer, a one-bucket sketch and the bitmap when sampling seen ids."""
    two_rows = 2 * 2 * embedding_dim * FLOAT_BYTES  # a holder row and a hashed row in each table
    one_pointer = columns + ID_BYTES
    return (
        fixed_bytes(columns)
        + coefficient_bytes(columns)
        + two_rows
        + one_pointer
        + HotSketch.bytes_for(1)
        + bitmap_bytes
    )


# honest every-id CCE never builds tables of fewer rows: at the edge of what its pointers leave, a budget bought k = 1
# (every id the same vector: val AUC 0.513 on 101k ids at 16x, where hash at 100x reached 0.739); it is refused instead
MIN_ROWS = 16
MIN_POINTS_PER_CENTROID = 39  # faiss's min_points_per_centroid: below it k-means warns that centroids are noise


def _every_id_plan(shape: CCEShape, budget: Budget, sample: str | None, tolerance: float) -> CCEPlan:
    """The paper's CCE: every id stores c pointers, in the smallest dtype holding k; the floats take the rest.

    Honest accounting cannot go below the pointers: ``n x c`` bytes (uint8, k <= 256) before any float, and k is at
    least :data:`MIN_ROWS`. A budget it cannot meet within ``tolerance`` raises BudgetError naming the ratio bands
    it reaches (uint8 and int16 pointers) and the highest.
    """
    n, d, c, B = shape.num_embeddings, shape.embedding_dim, shape.columns, budget.num_bytes
    row_bytes = 2 * d * FLOAT_BYTES
    bitmap = -(-n // 8) if sample == "seen" else 0
    ranges: list[tuple[str, int, int, int]] = []  # per dtype: its name, the least and most k, the reserved bytes
    candidates: list[tuple[float, int, CCEPlan]] = []  # per dtype: the budget missed, the dtype's order, the plan
    for limit, dtype in POINTER_DTYPES:
        buckets = 0
        if sample == "frequency":  # the sketch (for sampling only) takes what the pointer share leaves
            stored = n * c * torch.empty(0, dtype=dtype).element_size()
            free = shape.pointer_share * B - bitmap - (stored if shape.honest else 0)
            buckets = max(1, math.ceil(max(0.0, free - HotSketch.bytes_for(0)) / SLOT_BYTES / SKETCH_SLOTS))
        plan = CCEPlan(0, 0, True, n, dtype, buckets, bitmap)
        reserved = reserved_bytes(plan, c) if shape.honest else 0
        # any k this dtype holds: a wider dtype than k needs spends the bytes a budget between two ranges leaves
        least = MIN_ROWS if shape.honest else 1
        k = min(max(round((B - reserved) / row_bytes), least), limit)
        miss = abs(reserved + k * row_bytes - B) / B
        plan = CCEPlan(k, k, True, n, dtype, buckets, bitmap)
        if miss <= min(tolerance, BUDGET_TOLERANCE):  # the smallest dtype that meets the budget
            return plan
        candidates.append((miss, len(candidates), plan))
        ranges.append((str(dtype).removeprefix("torch."), least, limit, reserved))
    if not shape.honest or tolerance == math.inf:  # the nearest size (the caller accounts the bytes itself)
        return min(candidates)[2]
    full = n * d * FLOAT_BYTES
    # each dtype's band of k, up to the k at which the table would be no smaller than the full one
    bands = [
        (name, lo, min(high, int((full - reserved) // row_bytes)), reserved) for name, lo, high, reserved in ranges
    ]
    reach = ", ".join(
        f"{full / (reserved + high * row_bytes):.2f}x-{full / (reserved + lo * row_bytes):.2f}x with "
        f"{name} pointers (k {lo:,}-{high:,})"
        for name, lo, high, reserved in bands[:2]
        if high >= lo
    )
    smallest = math.ceil((ranges[0][3] + MIN_ROWS * row_bytes) / FLOAT_BYTES)
    raise BudgetError(
        f"cce cannot meet a budget of {B / FLOAT_BYTES:,.0f} params ({full / B:.2f}x): every id stores {c} pointers "
        f"({n:,} x {c} bytes or more before any float), so it reaches {reach}; the highest ratio it can reach is "
        f"{full / (ranges[0][3] + MIN_ROWS * row_bytes):.2f}x (the smallest budget it can meet is {smallest:,} "
        f"params; tables of fewer than {MIN_ROWS} rows are not built). "
        "cce-hybrid stores pointers for the top ids only; cce-paper counts the floats only"
    )


def plan_tables(
    shape: CCEShape, budget: Budget, pointers: int | None, sample: str | None, tolerance: float = BUDGET_TOLERANCE
) -> CCEPlan:
    """Table rows k, which ids hold stored pointers and their dtype, sketch and bitmap sizes (see CCEmbedding)."""
    n, d, c, B = shape.num_embeddings, shape.embedding_dim, shape.columns, budget.num_bytes
    row_bytes = 2 * d * FLOAT_BYTES  # one row of T0 and T1 in every column
    bitmap = -(-n // 8) if sample == "seen" else 0
    share = shape.pointer_share * B
    honest = shape.honest

    def k_for(reserved: float, smallest: int = 1) -> int:
        return max(smallest, round(((B - reserved) if honest else B) / row_bytes))

    def holder_rows(k: int) -> int:  # rows for holders; the rest (at least one) is the hashed region
        # no more centroids than k-means has points for: MIN_POINTS_PER_CENTROID of the ids it samples each
        # (the sketch's slots by default; the vocabulary when sampling uniformly or seen ids)
        points = n if sample in ("uniform", "seen") else (pointers or 1) * shape.sketch_slots_per_pointer
        return max(1, min(k - 1, round(shape.holder_share * k), int(points // MIN_POINTS_PER_CENTROID)))

    def sketch_buckets(slots: float) -> int:
        return max(1, math.ceil(slots / SKETCH_SLOTS))

    def plan_all(need_fit: bool) -> CCEPlan | None:
        for limit, dtype in POINTER_DTYPES:
            size = torch.empty(0, dtype=dtype).element_size()
            stored = n * c * size
            buckets = 0
            if sample == "frequency":  # the sketch (for sampling only) takes what the share leaves
                free = share - bitmap - stored if honest else share
                buckets = sketch_buckets(max(0.0, free - HotSketch.bytes_for(0)) / SLOT_BYTES)
            plan = CCEPlan(0, 0, True, n, dtype, buckets, bitmap)
            k = k_for(reserved_bytes(plan, c))
            if k <= limit:  # the first dtype that holds the k the rest of the budget buys
                if need_fit and (reserved_bytes(plan, c) - fixed_bytes(c) > share or pointer_dtype(k) != dtype):
                    return None  # over the share, or k falls between two dtypes: choose m instead
                return CCEPlan(k, k, True, n, dtype, buckets, bitmap)
        raise AssertionError("unreachable: int32 holds every k")

    if not shape.hybrid or (pointers is not None and pointers >= n):
        return _every_id_plan(shape, budget, sample, tolerance)
    if pointers is None:
        fitted = plan_all(need_fit=True)
        if fitted is not None:
            return fitted
        # as many as the share holds, at the smallest dtype holding the holder rows the rest of the budget buys
        for limit, dtype in POINTER_DTYPES:
            size = torch.empty(0, dtype=dtype).element_size()
            per_pointer = c * size + ID_BYTES + shape.sketch_slots_per_pointer * SLOT_BYTES
            pointers = int(max(1, min(n, (share - bitmap - HotSketch.bytes_for(0)) // per_pointer)))
            if holder_rows(k_for(share, 2)) <= limit:
                break
    assert pointers is not None  # given, or set by the loop above (POINTER_DTYPES is not empty)
    for limit, dtype in POINTER_DTYPES:
        plan = CCEPlan(0, 0, False, pointers, dtype, sketch_buckets(pointers * shape.sketch_slots_per_pointer), bitmap)
        k = k_for(reserved_bytes(plan, c), 2)
        if holder_rows(k) <= limit:  # pointers index the holder rows
            return CCEPlan(k, holder_rows(k), False, pointers, dtype, plan.sketch_buckets, bitmap)
    raise AssertionError("unreachable: int32 holds every k")
