"""The HotSketch's compiled kernels (numba, CPU): insert with the paper's Space-Saving rule and decays, queries, and
the hot-row bookkeeping, over the sketch's numpy views (:class:`compemb.sketch.hotsketch.HotSketch` calls them; its
torch ops for a device are :mod:`compemb.sketch.torch_ops`)."""

from __future__ import annotations

import numba
import numpy as np

from compemb.hashing import bucket_of

MAX_ROW = 2**31 - 1  # the largest hot row a slot holds (int32)

# --- compiled kernels ----------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def insert_kernel(ids, scores, unit, keys, table, rows, occupied, mass, coefficients, limit, factor, counted, skip_hot):
    """Apply a batch; returns the index of the first bad score (nothing changed then) or -1, and the decays.
    ``counted`` >= 0: the mass the batch counts towards the decay (else the sum of its scores); ``skip_hot``: a
    newcomer to a full bucket looks for the lowest slot among those holding no hot ID."""
    # check every score before touching the sketch, so a bad batch leaves it as it was
    bad, total = _checked_total(scores, unit, ids.shape[0])
    if bad >= 0:
        return bad, 0
    count, unique_ids, unique_mixed, unique_scores = _sum_duplicates(ids, scores, unit, coefficients)
    _space_saving(count, unique_ids, unique_mixed, unique_scores, keys, table, rows, occupied, skip_hot)
    return -1, _decay_past_period(table, mass, total if counted < 0.0 else counted, limit, factor)


@numba.njit(cache=True, nogil=True)
def _checked_total(scores, unit, n):
    """(index of the first score that is negative, NaN or infinite, or -1; the batch's total score)."""
    total = 0.0
    if unit:
        total = float(n)
    else:
        for i in range(n):
            s = scores[i]
            if not (s >= 0.0 and s < np.inf):  # NaN fails every comparison
                return i, 0.0
            total += s
    return -1, total


@numba.njit(cache=True, nogil=True)
def _sum_duplicates(ids, scores, unit, coefficients):
    """The batch's distinct IDs in order of first occurrence, with their hashes' mixed values and summed scores:
    ``(count, unique_ids, unique_mixed, unique_scores)``, the arrays valid up to ``count``."""
    n = ids.shape[0]
    a, b = coefficients[0, 0], coefficients[0, 1]
    # sum duplicates in an open-addressing table (at most half full), remembering first occurrences in order
    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    mask = (1 << bits) - 1
    shift = 64 - bits
    index = np.full(mask + 1, -1, dtype=np.int32)
    unique_ids = np.empty(n, dtype=np.int64)
    unique_mixed = np.empty(n, dtype=np.int64)
    unique_scores = np.empty(n, dtype=np.float32)
    count = 0
    one = np.float32(1.0)
    for i in range(n):
        x = np.int64(ids[i])
        mixed = a * x + b  # wraps modulo 2^64, as in compemb.hashing
        s = one if unit else scores[i]
        h = (mixed >> shift) & mask  # top bits: the well-mixed ones
        while True:
            u = index[h]
            if u < 0:
                index[h] = count
                unique_ids[count] = x
                unique_mixed[count] = mixed
                unique_scores[count] = s
                count += 1
                break
            if unique_ids[u] == x:
                unique_scores[u] += s  # float32, in batch order
                break
            h = (h + 1) & mask
    return count, unique_ids, unique_mixed, unique_scores


@numba.njit(cache=True, nogil=True)
def _space_saving(count, unique_ids, unique_mixed, unique_scores, keys, table, rows, occupied, skip_hot):
    """Apply the first ``count`` distinct IDs one after another, Space-Saving inside each bucket."""
    num_buckets, num_slots = keys.shape
    for k in range(count):
        x = unique_ids[k]
        s = unique_scores[k]
        bucket = bucket_of(unique_mixed[k], num_buckets)
        empty = -1
        lowest = -1
        found = False
        for j in range(num_slots):
            if occupied[bucket, j]:
                if keys[bucket, j] == x:
                    table[bucket, j] += s
                    found = True
                    break
                if skip_hot and rows[bucket, j] >= 0:
                    continue
                if lowest < 0 or table[bucket, j] < table[bucket, lowest]:  # ties: the lowest slot index
                    lowest = j
            elif empty < 0:
                empty = j
        if found:
            continue
        if empty >= 0:
            occupied[bucket, empty] = True
            keys[bucket, empty] = x
            table[bucket, empty] = s
            rows[bucket, empty] = -1
        elif lowest >= 0 and rows[bucket, lowest] < 0:
            keys[bucket, lowest] = x
            table[bucket, lowest] += s  # the newcomer inherits the count it displaces (Space-Saving)
        # else: the lowest slot (with skip_hot: every slot) holds a hot ID, which keeps its place; the new ID is dropped


@numba.njit(cache=True, nogil=True)
def _decay_past_period(table, mass, counted, limit, factor):
    """Count ``counted`` towards the decay; past a period of mass decay once (at most once a call, as the authors'
    batch_insert) and count afresh. Returns the decays (0 or 1)."""
    mass[0] += counted
    periods = 0
    if mass[0] > limit:
        mass[0] = 0.0
        if factor < 1.0:
            periods = 1
            scale_scores(table, factor)
    return periods


@numba.njit(cache=True, nogil=True)
def scale_scores(table, scale):
    """Multiply every score by ``scale`` (float64), rounding each product once to float32."""
    flat = table.reshape(-1)
    for i in range(flat.shape[0]):
        flat[i] = np.float32(flat[i] * scale)


@numba.njit(cache=True, nogil=True)
def query_kernel(ids, keys, table, rows, occupied, coefficients, out_scores, out_rows):
    """Score and hot row of each ID (0 and -1 when absent)."""
    num_buckets, num_slots = keys.shape
    a, b = coefficients[0, 0], coefficients[0, 1]
    for i in range(ids.shape[0]):
        x = np.int64(ids[i])
        bucket = bucket_of(a * x + b, num_buckets)
        score = np.float32(0.0)
        row = np.int32(-1)
        for j in range(num_slots):
            if occupied[bucket, j] and keys[bucket, j] == x:
                score = table[bucket, j]
                row = rows[bucket, j]
                break
        out_scores[i] = score
        out_rows[i] = row


@numba.njit(cache=True, nogil=True)
def locate_slots(ids, keys, occupied, coefficients):
    """Flat slot index of each ID, -1 when absent."""
    num_buckets, num_slots = keys.shape
    a, b = coefficients[0, 0], coefficients[0, 1]
    where = np.empty(ids.shape[0], dtype=np.int64)
    for i in range(ids.shape[0]):
        x = np.int64(ids[i])
        bucket = bucket_of(a * x + b, num_buckets)
        where[i] = -1
        for j in range(num_slots):
            if occupied[bucket, j] and keys[bucket, j] == x:
                where[i] = bucket * num_slots + j
                break
    return where


@numba.njit(cache=True, nogil=True)
def set_hot_kernel(ids, new_rows, keys, rows, occupied, coefficients):
    """Give each ID its row; returns (0, -1), or (1, i) for a bad row i, or (2, i) for an absent ID i."""
    for i in range(new_rows.shape[0]):
        if new_rows[i] < 0 or new_rows[i] > MAX_ROW:
            return 1, i
    where = locate_slots(ids, keys, occupied, coefficients)
    for i in range(where.shape[0]):
        if where[i] < 0:
            return 2, i
    flat = rows.reshape(-1)
    for i in range(where.shape[0]):
        flat[where[i]] = new_rows[i]  # a repeated ID keeps its last row
    return 0, -1


@numba.njit(cache=True, nogil=True)
def clear_hot_kernel(ids, keys, rows, occupied, coefficients):
    """Take the row from each present ID; returns the rows taken (-1 for absent or not hot IDs)."""
    where = locate_slots(ids, keys, occupied, coefficients)
    flat = rows.reshape(-1)
    released = np.full(where.shape[0], -1, dtype=np.int32)
    for i in range(where.shape[0]):
        if where[i] >= 0:
            released[i] = flat[where[i]]
            flat[where[i]] = -1
    return released


@numba.njit(cache=True, nogil=True)
def hot_below_kernel(keys, table, rows, occupied, threshold):
    """IDs and rows of the hot slots whose score is below ``threshold``, in slot order."""
    flat_keys, flat_scores = keys.reshape(-1), table.reshape(-1)
    flat_rows, flat_used = rows.reshape(-1), occupied.reshape(-1)
    count = 0
    for i in range(flat_rows.shape[0]):
        if flat_used[i] and flat_rows[i] >= 0 and flat_scores[i] < threshold:
            count += 1
    out_ids = np.empty(count, dtype=np.int64)
    out_rows = np.empty(count, dtype=np.int32)
    count = 0
    for i in range(flat_rows.shape[0]):
        if flat_used[i] and flat_rows[i] >= 0 and flat_scores[i] < threshold:
            out_ids[count] = flat_keys[i]
            out_rows[count] = flat_rows[i]
            count += 1
    return out_ids, out_rows


@numba.njit(cache=True, nogil=True)
def hot_count_kernel(rows, occupied):
    flat_rows, flat_used = rows.reshape(-1), occupied.reshape(-1)
    count = 0
    for i in range(flat_rows.shape[0]):
        if flat_used[i] and flat_rows[i] >= 0:
            count += 1
    return count
