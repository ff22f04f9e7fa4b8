"""The CAFE authors' per-field layout, shared by ``cafe``/``cafe-ml`` and ``hash-fields`` (their hash baseline).

In one shared collection (``blocks``: the features' sizes, in id order) each field gets a hashed table of its own,
its rows in proportion to its ids, and a field of n ids with ``n x ratio <= FULL_FIELD_IDS`` keeps a row per id
(HugoZHL/CAFE ``embeddings/init_embed.py``). compemb's deviations: full fields are kept smallest first while they
take at most half the budget (the authors' rule alone can spend all of a small set's budget on them), and the
largest field is always compressed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from compemb.budget import FLOAT_BYTES

FULL_FIELD_IDS = 2000  # the authors' rule: a field of n ids with n x ratio <= 2000 stays uncompressed


def plan_fields(sizes: Sequence[int], embedding_dim: int, ratio: float | None, budget_bytes: int) -> list[bool]:
    """Which fields stay full: the authors' rule, smallest first while the full ones take at most half the budget;
    never the largest."""
    sizes = [int(n) for n in sizes]
    full, spent = [False] * len(sizes), 0
    largest = sizes.index(max(sizes))
    for f in sorted(range(len(sizes)), key=lambda f: (sizes[f], f)):
        cost = sizes[f] * embedding_dim * FLOAT_BYTES
        if f != largest and sizes[f] * (ratio or math.inf) <= FULL_FIELD_IDS and spent + cost <= budget_bytes / 2:
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
