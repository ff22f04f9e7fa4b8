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

from typing import overload

import torch
from torch import Tensor

from compemb.hashing import hash_ids
from compemb.sketch.kernels import MAX_ROW

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


def query(
    ids: Tensor, keys: Tensor, table: Tensor, rows: Tensor, occupied: Tensor, coefficients: Tensor
) -> tuple[Tensor, Tensor]:
    """Score (float32) and hot row (int32) of each ID of a 1-D ``ids``: 0 and -1 when absent."""
    where = locate(ids, keys, occupied, coefficients)
    found, at = where >= 0, where.clamp_min(0)
    scores = torch.where(found, table.view(-1)[at], 0.0)
    hot = torch.where(found, rows.view(-1)[at], -1)
    return scores, hot


def set_hot(ids: Tensor, rows: Tensor, keys: Tensor, hot_rows: Tensor, occupied: Tensor, coefficients: Tensor) -> None:
    """Give each of the 1-D ``ids`` its row from ``rows`` (in place); ValueError for a row out of range or an ID
    not in the sketch (nothing changes then). One read back: the first bad row and the first absent ID."""
    where = locate(ids, keys, occupied, coefficients)
    bad_row = (rows < 0) | (rows > MAX_ROW)
    absent = where < 0
    first_bad, first_absent = (
        int(i)
        for i in torch.stack(
            [
                torch.where(bad_row.any(), bad_row.to(torch.uint8).argmax(), -1)
                if rows.numel()
                else rows.new_tensor(-1),
                torch.where(absent.any(), absent.to(torch.uint8).argmax(), -1) if ids.numel() else ids.new_tensor(-1),
            ]
        ).tolist()
    )
    if first_bad >= 0:
        raise ValueError(f"rows must be in [0, {MAX_ROW}], got {int(rows[first_bad])}")
    if first_absent >= 0:
        raise ValueError(f"id {int(ids[first_absent])} is not in the sketch: only present IDs can be made hot")
    hot_rows.view(-1)[where] = rows.to(torch.int32)


def set_hot_where(
    ids: Tensor, rows: Tensor, where: Tensor, keys: Tensor, hot_rows: Tensor, occupied: Tensor, coefficients: Tensor
) -> None:
    """:func:`set_hot` for the ``where`` entries only, in fixed shapes (nothing read back): those ids must be
    present, distinct and not hot; the others are left alone."""
    at = locate(ids, keys, occupied, coefficients)
    chosen = where.to(keys.device) & (at >= 0)
    flat = hot_rows.view(-1)
    # adding 0 where nothing is chosen leaves any slot (repeated or not) as it was
    step = torch.where(chosen, rows.to(keys.device, torch.int32) - flat[at.clamp_min(0)], 0)
    flat.index_put_((at.clamp_min(0),), step.to(torch.int32), accumulate=True)


def clear_hot(ids: Tensor, keys: Tensor, hot_rows: Tensor, occupied: Tensor, coefficients: Tensor) -> Tensor:
    """Take their rows from the 1-D ``ids`` (in place); returns the rows taken (-1 where there was none)."""
    where = locate(ids, keys, occupied, coefficients)
    flat_rows, found = hot_rows.view(-1), where >= 0
    released = torch.where(found, flat_rows[where.clamp_min(0)], -1)
    flat_rows[where[found]] = -1
    return released


def plan_insert(
    ids: Tensor, scores: Tensor | None, num_buckets: int, coefficients: Tensor, mass: Tensor
) -> tuple[Tensor, ...]:
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


def apply_round(
    ids: Tensor,
    scores: Tensor,
    buckets: Tensor,
    keys: Tensor,
    table: Tensor,
    rows: Tensor,
    occupied: Tensor,
    skip_hot: bool = False,
) -> None:
    """Space-Saving for distinct IDs in distinct buckets, all at once (in place); ``skip_hot``: a newcomer to a
    full bucket takes the lowest slot among those holding no hot ID."""
    num_slots = keys.shape[1]
    bucket_keys, bucket_used, bucket_scores = keys[buckets], occupied[buckets], table[buckets]
    match = bucket_used & (bucket_keys == ids.unsqueeze(-1))
    found = match.any(-1)
    empty = ~bucket_used
    has_empty = empty.any(-1)
    # torch's argmin/argmax return the first of equal values: ties go to the lowest slot, as on CPU
    candidates = bucket_used & (rows[buckets] < 0) if skip_hot else bucket_used
    lowest = torch.where(candidates, bucket_scores, _INF).argmin(-1)  # every slot hot (skip_hot): slot 0, hot
    slot = torch.where(
        found, match.to(torch.uint8).argmax(-1), torch.where(has_empty, empty.to(torch.uint8).argmax(-1), lowest)
    )
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


def apply_rounds(
    ids: Tensor,
    scores: Tensor,
    buckets: Tensor,
    by_round: Tensor,
    per_round: list[int],
    keys: Tensor,
    table: Tensor,
    rows: Tensor,
    occupied: Tensor,
    skip_hot: bool = False,
) -> None:
    """:func:`apply_round` for each round of :func:`plan_insert`'s plan: ``per_round[r]`` IDs, the next ones of
    ``by_round``, in round ``r``."""
    start = 0
    for count in per_round:
        chosen = by_round[start : start + count]
        start += count
        apply_round(ids[chosen], scores[chosen], buckets[chosen], keys, table, rows, occupied, skip_hot=skip_hot)


def hot_below(keys: Tensor, table: Tensor, rows: Tensor, occupied: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """IDs (int64) and rows (int32) of the hot slots scoring below ``threshold``, in slot order."""
    chosen = (occupied & (rows >= 0) & (table < threshold)).view(-1)
    return keys.view(-1)[chosen], rows.view(-1)[chosen]


@overload
def distinct_sums(
    ids: Tensor, values: Tensor, keep: Tensor | None = None, groups: None = None
) -> tuple[Tensor, Tensor, Tensor, None]: ...
@overload
def distinct_sums(
    ids: Tensor, values: Tensor, keep: Tensor | None = None, *, groups: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...
@overload
def distinct_sums(
    ids: Tensor, values: Tensor, keep: Tensor | None = None, groups: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]: ...
def distinct_sums(
    ids: Tensor, values: Tensor, keep: Tensor | None = None, groups: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The distinct ``ids`` (ascending) with their summed ``values``, in fixed shapes: ``len(ids)`` slots, the
    distinct ones first, then slots flagged invalid. Duplicates are summed in batch order (a stable sort), as the
    compiled kernel sums them. ``keep`` (optional, ``ids``' shape): an id none of whose occurrences is kept is
    flagged invalid too. ``groups`` (optional, ``ids``' shape): distinct (group, id) pairs instead, ordered by group
    then id (a flat sketch's buckets: the same id in two tables is two entries). Returns ``(distinct_ids, sums,
    valid, their groups or None)``; nothing is read back to the host."""
    n = ids.numel()
    sorted_ids, order = torch.sort(ids, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    sorted_groups = None
    if groups is not None:  # then by group, keeping the id order (and the batch order of equal pairs)
        by_group = torch.sort(groups.reshape(-1)[order], stable=True)
        sorted_groups, order = by_group.values, order[by_group.indices]
        sorted_ids = ids[order]
        starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]) | (sorted_groups[1:] != sorted_groups[:-1])
    else:
        starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = torch.cumsum(starts, 0) - 1
    sums = values.new_zeros(n).index_add_(0, segment, values.index_select(0, order))
    distinct = torch.zeros_like(sorted_ids).scatter_(0, segment, sorted_ids)
    distinct_groups = (
        None if sorted_groups is None else torch.zeros_like(sorted_groups).scatter_(0, segment, sorted_groups)
    )
    valid = torch.arange(n, device=ids.device) <= segment[-1]
    if keep is not None:
        kept = torch.zeros(n, dtype=torch.int32, device=ids.device).index_add_(
            0, segment, keep.reshape(-1).index_select(0, order).to(torch.int32)
        )
        valid &= kept > 0
    return distinct, sums, valid, distinct_groups


def merge_insert(
    ids: Tensor,
    scores: Tensor,
    keep: Tensor | None,
    keys: Tensor,
    table: Tensor,
    rows: Tensor,
    occupied: Tensor,
    coefficients: Tensor | None,
    buckets: Tensor | None = None,
    skip_hot: bool = False,
) -> None:
    """A batch into the sketch in a constant number of vectorised passes (in place), whatever the load per bucket.

    A mergeable Space-Saving: the batch's distinct IDs and summed scores are a summary merged into each bucket's
    ``c`` slots at once. A resident ID adds its score. The ``c`` best newcomers of a bucket (by score, ties by
    ID) compete with its residents: a newcomer's estimate is its score plus the bucket's lowest score when the
    bucket is full (it inherits the minimum, as in Space-Saving), its score alone while a slot is empty; the ``c``
    highest of residents and newcomers stay (residents win ties, hot residents always stay, empty slots go first)
    and a newcomer that stays scores its estimate. A bucket whose lowest slot is hot takes no newcomer, as in the
    sequential sketch; with ``skip_hot`` the minimum is the lowest score of the slots holding no hot ID, and only a
    bucket of hot IDs alone takes none.

    Where it differs from sequential Space-Saving (the compiled kernel): there, the newcomers of one bucket enter
    one after another, each displacing the current minimum, so several small newcomers churn one slot, which ends
    with their summed score under the last one's ID; here the best of them takes that slot with its own score
    plus the minimum, and a strong newcomer may displace a resident above the minimum. ``keep`` (optional, the
    shape of ``ids``) leaves out the entries where it is False. Scores must be finite and >= 0 (not checked here).

    ``buckets`` (optional, ``ids``' shape): each entry's bucket, given instead of hashed with ``coefficients``: several
    tables' sketches laid end to end in one set of buffers (table t's buckets offset by the buckets before it) take
    all their batches in one merge, exactly as each would alone (the same id in two tables is two entries).
    """
    num_buckets, slots = keys.shape
    n = ids.numel()
    if n == 0:
        return
    if buckets is None:
        assert coefficients is not None  # the ids are hashed when their buckets are not given
        distinct, sums, valid, _ = distinct_sums(ids, scores, keep)
        bucket = buckets_of(distinct, coefficients, num_buckets)
    else:
        distinct, sums, valid, bucket = distinct_sums(ids, scores, keep, groups=buckets)
    found = _add_to_residents(distinct, sums, valid, bucket, keys, table, occupied)
    new_ids, new_scores, target, groups = _newcomers_by_bucket(distinct, sums, valid & ~found, bucket, keys, table)
    _merge_into_buckets(new_ids, new_scores, target, groups, keys, table, rows, occupied, skip_hot)


def _add_to_residents(
    distinct: Tensor, sums: Tensor, valid: Tensor, bucket: Tensor, keys: Tensor, table: Tensor, occupied: Tensor
) -> Tensor:
    """Add the batch's scores to the IDs already in their buckets (in place); returns which distinct IDs were."""
    slots = keys.shape[1]
    # residents: add the batch's scores to the IDs already there (an add of 0 elsewhere changes nothing)
    match = occupied[bucket] & (keys[bucket] == distinct.unsqueeze(-1)) & valid.unsqueeze(-1)
    found = match.any(-1)
    flat = bucket * slots + match.to(torch.uint8).argmax(-1)
    table.view(-1).index_add_(0, flat, torch.where(found, sums, 0.0))
    return found


def _newcomers_by_bucket(
    distinct: Tensor, sums: Tensor, newcomer: Tensor, bucket: Tensor, keys: Tensor, table: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each touched bucket's best ``slots`` newcomers, a row per bucket: ``(new_ids, new_scores, target, groups)``,
    ``len(distinct)`` rows, ``target`` each row's bucket, ``groups`` how many buckets take newcomers (on the
    device); rows past the last touched bucket repeat it, and missing candidates score ``-inf``."""
    num_buckets, slots = keys.shape
    n, device = distinct.numel(), distinct.device
    # newcomers: grouped by bucket, best first; the first `slots` of each bucket are its candidates
    by_score = torch.argsort(-sums, stable=True)
    grouping = torch.where(newcomer, bucket, num_buckets)[by_score]
    by_bucket = torch.argsort(grouping, stable=True)
    order = by_score[by_bucket]
    sorted_bucket = grouping[by_bucket]
    rank = torch.arange(n, device=device) - torch.searchsorted(sorted_bucket, sorted_bucket)
    candidate = (rank < slots) & (sorted_bucket < num_buckets)
    first = candidate & (rank == 0)
    group = torch.cumsum(first, 0) - 1  # each bucket's row among the touched ones
    groups = group[-1] + 1  # how many buckets take newcomers (stays on the device)
    # one row per touched bucket, a padding row (n) for everything else
    row = torch.where(candidate, group, n)
    column = torch.where(candidate, rank, 0)
    new_ids = torch.zeros(n + 1, slots, dtype=keys.dtype, device=device)
    new_scores = torch.full((n + 1, slots), -_INF, dtype=table.dtype, device=device)
    new_ids[row, column] = distinct[order]
    new_scores[row, column] = torch.where(candidate, sums[order], -_INF)
    target = torch.zeros(n + 1, dtype=torch.int64, device=device)
    target[torch.where(first, group, n)] = sorted_bucket
    # rows past the last touched bucket repeat it: they compute and write exactly its values
    at = torch.minimum(torch.arange(n, device=device), (groups - 1).clamp_min(0))
    return new_ids[at], new_scores[at], target[at], groups


def _merge_into_buckets(
    new_ids: Tensor,
    new_scores: Tensor,
    target: Tensor,
    groups: Tensor,
    keys: Tensor,
    table: Tensor,
    rows: Tensor,
    occupied: Tensor,
    skip_hot: bool,
) -> None:
    """Merge each row's newcomers with the residents of its bucket ``target``: the ``slots`` highest stay (in
    place; see :func:`merge_insert`)."""
    slots = keys.shape[1]
    resident_keys, resident_scores = keys[target], table[target]
    resident_rows, resident_used = rows[target], occupied[target]
    full = resident_used.all(-1)
    hot = resident_rows >= 0
    if skip_hot:  # the minimum of the slots a newcomer may take; none: no newcomer enters
        lowest_score = torch.where(resident_used & ~hot, resident_scores, _INF).min(-1).values
        closed = full & hot.all(-1)
    else:
        lowest_score, lowest = torch.where(resident_used, resident_scores, _INF).min(-1)
        closed = full & hot.gather(-1, lowest.unsqueeze(-1)).squeeze(-1)  # the lowest is hot: no newcomer enters
    estimate = new_scores + torch.where(full, lowest_score, 0.0).unsqueeze(-1)
    estimate = torch.where(closed.unsqueeze(-1) | (new_scores == -_INF), -_INF, estimate)
    resident_rank = torch.where(resident_used, torch.where(hot, _INF, resident_scores), -_INF)
    chosen = torch.sort(torch.cat([resident_rank, estimate], -1), dim=-1, descending=True, stable=True)[1][:, :slots]
    entrant = chosen >= slots
    from_resident = chosen.clamp_max(slots - 1)
    from_newcomer = (chosen - slots).clamp_min(0)
    pick = lambda resident, newcomer: torch.where(  # noqa: E731
        entrant, newcomer.gather(-1, from_newcomer), resident.gather(-1, from_resident)
    )
    merged_keys = pick(resident_keys, new_ids)
    merged_scores = pick(resident_scores, estimate)
    merged_rows = torch.where(entrant, -1, resident_rows.gather(-1, from_resident))
    merged_used = entrant | resident_used.gather(-1, from_resident)
    # no newcomer anywhere: every row stands for bucket 0, which must keep its slots as they are
    touched = groups > 0
    merged_keys = torch.where(touched, merged_keys, resident_keys)
    merged_scores = torch.where(touched, merged_scores, resident_scores)
    merged_rows = torch.where(touched, merged_rows, resident_rows)
    merged_used = torch.where(touched, merged_used, resident_used)
    keys.index_copy_(0, target, merged_keys)
    table.index_copy_(0, target, merged_scores)
    rows.index_copy_(0, target, merged_rows.to(rows.dtype))
    occupied.index_copy_(0, target, merged_used)
