"""HotSketch's operations in torch ops, for a sketch whose buffers live on an accelerator.

They compute what the compiled CPU kernels of :mod:`compemb.sketch.hotsketch` compute (the tests hold the two equal
slot for slot on CPU), without leaving the device: an insert reads back one small vector (whether a score was bad,
the decay mass, how many IDs each round applies) and nothing else.

Space-Saving is sequential inside a bucket, so an insert runs in rounds: round r applies, in every bucket at once,
the r-th distinct ID of the batch to fall in it (in order of first occurrence). Buckets are independent, so this
is the sequential order of the CPU kernel; a batch costs as many rounds as the most IDs it sends to one bucket
(a handful when the sketch has many more buckets than a batch has IDs).

Float sums: duplicates are summed with ``index_add_`` (in batch order on CPU; on CUDA atomics may round a sum of
three or more duplicates differently in its last bit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from compemb.hashing import hash_ids

_INF = float("inf")


def buckets_of(ids: Tensor, coefficients: Tensor, num_buckets: int) -> Tensor:
    """The bucket of each ID (int64, ``ids``' shape): the sketch's hash."""
    return hash_ids(ids, coefficients, num_buckets).squeeze(-1)


def locate(ids: Tensor, keys: Tensor, occupied: Tensor, coefficients: Tensor) -> Tensor:
    """Flat slot index of each ID of a 1-D ``ids``, -1 when absent."""
    num_buckets, num_slots = keys.shape
    bucket = buckets_of(ids, coefficients, num_buckets)
    match = (keys[bucket] == ids.unsqueeze(-1)) & occupied[bucket]
    slot = match.to(torch.uint8).argmax(-1)  # the first match; there is at most one
    return torch.where(match.any(-1), bucket * num_slots + slot, -1)


def query(ids: Tensor, keys: Tensor, table: Tensor, rows: Tensor, occupied: Tensor,
          coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """Score (float32) and hot row (int32) of each ID of a 1-D ``ids``: 0 and -1 when absent."""
    where = locate(ids, keys, occupied, coefficients)
    found, at = where >= 0, where.clamp_min(0)
    scores = torch.where(found, table.view(-1)[at], 0.0)
    hot = torch.where(found, rows.view(-1)[at], -1)
    return scores, hot


def plan_insert(ids: Tensor, scores: Tensor | None, num_buckets: int, coefficients: Tensor,
                mass: Tensor) -> tuple[Tensor, ...]:
    """Everything an insert needs before it changes the sketch, and the one vector the host reads back.

    Returns ``(unique_ids, unique_scores, unique_buckets, by_round, readback)``: the distinct IDs with their
    summed scores (float32) and buckets; their positions sorted by round; and a float64 vector
    ``[first bad score index or -1, mass before, mass after the batch, IDs in round 0, in round 1, ...]``.
    """
    n = ids.numel()
    device = ids.device
    if scores is None:
        bad = torch.tensor(-1.0, dtype=torch.float64, device=device)
        values = torch.ones(n, dtype=torch.float32, device=device)
        total = torch.tensor(float(n), dtype=torch.float64, device=device)
    else:
        invalid = ~((scores >= 0) & (scores < _INF))  # NaN fails both comparisons
        first = invalid.to(torch.uint8).argmax() if n else torch.zeros((), dtype=torch.int64, device=device)
        bad = torch.where(invalid.any(), first, -1).to(torch.float64)
        values, total = scores, scores.double().sum()
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    m = unique_ids.numel()
    positions = torch.arange(n, device=device)
    first_seen = torch.full((m,), n, dtype=torch.int64, device=device).scatter_reduce_(0, inverse, positions, "amin")
    unique_scores = torch.zeros(m, dtype=torch.float32, device=device).index_add_(0, inverse, values)
    unique_buckets = buckets_of(unique_ids, coefficients, num_buckets)
    # rank of each distinct ID among those of its bucket, by first occurrence: the round it is applied in
    order = torch.argsort(unique_buckets * max(n, 1) + first_seen)
    sorted_buckets = unique_buckets[order]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(m, device=device) - torch.searchsorted(sorted_buckets, sorted_buckets)
    by_round = torch.argsort(rank, stable=True)
    per_round = torch.bincount(rank).to(torch.float64)
    readback = torch.cat([torch.stack([bad, mass[0], mass[0] + total]), per_round])
    return unique_ids, unique_scores, unique_buckets, by_round, readback


def apply_round(ids: Tensor, scores: Tensor, buckets: Tensor, keys: Tensor, table: Tensor, rows: Tensor,
                occupied: Tensor) -> None:
    """Space-Saving for distinct IDs in distinct buckets, all at once (in place)."""
    num_slots = keys.shape[1]
    bucket_keys, bucket_used, bucket_scores = keys[buckets], occupied[buckets], table[buckets]
    match = bucket_used & (bucket_keys == ids.unsqueeze(-1))
    found = match.any(-1)
    empty = ~bucket_used
    has_empty = empty.any(-1)
    # torch's argmin/argmax return the first of equal values: ties go to the lowest slot, as on CPU
    lowest = torch.where(bucket_used, bucket_scores, _INF).argmin(-1)
    slot = torch.where(found, match.to(torch.uint8).argmax(-1),
                       torch.where(has_empty, empty.to(torch.uint8).argmax(-1), lowest))
    flat = buckets * num_slots + slot
    current_score, current_key = table.view(-1)[flat], keys.view(-1)[flat]
    current_row = rows.view(-1)[flat]
    entering = ~found & has_empty
    taking_over = ~found & ~has_empty & (current_row < 0)  # a hot lowest slot keeps its ID: the newcomer is dropped
    changed = found | entering | taking_over
    new_score = torch.where(entering, scores, current_score + scores)
    table.view(-1)[flat] = torch.where(changed, new_score, current_score)
    keys.view(-1)[flat] = torch.where(entering | taking_over, ids, current_key)
    rows.view(-1)[flat] = torch.where(entering, -1, current_row)
    occupied.view(-1)[flat] = bucket_used.gather(-1, slot.unsqueeze(-1)).squeeze(-1) | entering


def hot_below(keys: Tensor, table: Tensor, rows: Tensor, occupied: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """IDs (int64) and rows (int32) of the hot slots scoring below ``threshold``, in slot order."""
    chosen = (occupied & (rows >= 0) & (table < threshold)).view(-1)
    return keys.view(-1)[chosen], rows.view(-1)[chosen]
