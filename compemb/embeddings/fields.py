"""The CAFE authors' per-field layout, shared by ``cafe``/``cafe-ml`` and ``hash-fields`` (their hash baseline).

In one shared collection (``blocks``: the features' sizes, in id order) each field gets a hashed table of its own,
its rows in proportion to its ids, and a small field keeps a row per id: n ids with ``n <= 400 / (1 + log2(ratio))``
(HugoZHL/CAFE ``embeddings/init_embed.py``: ``compress_threshold = 400 / (1 - log2(compress_rate))``; 28 ids at
10,000x, 36 at 1,000x, 52 at 100x, 92 at 10x). Until 2026-12-06 compemb read the rule as ``n x ratio <= 2000``,
which keeps no field full at 1,000x and above. compemb's deviations: full fields are kept smallest first while they
take at most half the budget (the authors' rule alone can spend all of a small set's budget on them), and the
largest field is always compressed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from compemb.budget import FLOAT_BYTES

FULL_FIELD_SCALE = 400  # the authors' rule: a field of n <= 400 / (1 + log2(ratio)) ids stays uncompressed


def full_field_ids(ratio: float | None) -> float:
    """The most ids a field may have and stay uncompressed at ``ratio`` (the authors' rule; None: none stays)."""
    if ratio is None or not math.isfinite(ratio):
        return 0.0
    return FULL_FIELD_SCALE / (1 + math.log2(max(ratio, 1.0)))


def plan_fields(sizes: Sequence[int], embedding_dim: int, ratio: float | None, budget_bytes: int) -> list[bool]:
    """Which fields stay full: the authors' rule, smallest first while the full ones take at most half the budget;
    never the largest."""
    sizes = [int(n) for n in sizes]
    most = full_field_ids(ratio)
    full, spent = [False] * len(sizes), 0
    largest = sizes.index(max(sizes))
    for f in sorted(range(len(sizes)), key=lambda f: (sizes[f], f)):
        cost = sizes[f] * embedding_dim * FLOAT_BYTES
        if f != largest and sizes[f] <= most and spent + cost <= budget_bytes / 2:
            full[f], spent = True, spent + cost
    return full


def split_rows(total: int, sizes: list[int]) -> list[int]:
    """``total`` rows shared out as one each, the rest in proportion to ``sizes`` (largest remainders): they sum to
    ``total`` (to one per size when ``total`` is smaller).

    Example::

        >>> split_rows(10, [100, 300]), split_rows(1, [5, 5])
        ([3, 7], [1, 1])
    """
    if len(sizes) <= 1:  # one vocabulary (of any size, open too): all of it
        return [total] * len(sizes)
    spare = max(0, total - len(sizes))
    exact = [spare * n / sum(sizes) for n in sizes]
    shares = [1 + math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in by_remainder[: max(0, max(total, len(sizes)) - sum(shares))]:
        shares[i] += 1
    return shares
