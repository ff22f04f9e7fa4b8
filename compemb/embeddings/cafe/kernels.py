"""CAFE's compiled CPU kernels: routing ids to rows in one pass, and choosing the ids that take free hot rows.

:class:`~compemb.embeddings.cafe.embedding.CAFEEmbedding` falls back to torch ops (the same rows) off the CPU.
"""

from __future__ import annotations

import numba
import numpy as np

from compemb.hashing import bucket_of


@numba.njit(cache=True, nogil=True)
def cafe_rows(
    ids,
    keys,
    scores,
    hot_rows,
    occupied,
    sketch_coefficients,
    coefficients,
    starts,
    direct,
    rows,
    offsets,
    medium,
    out_rows,
    out_weights,
):
    """Row(s) of each id: its hot row, else its field's hashed row (or its own row in a field kept full); two
    levels add the second row, weighted 1 if medium. Field f holds ids ``[starts[f], starts[f + 1])``; level l of
    field f is ``rows[l, f]`` rows from ``offsets[l, f]`` (one field: the whole vocabulary)."""
    num_buckets, num_slots = keys.shape
    sa, sb = sketch_coefficients[0, 0], sketch_coefficients[0, 1]
    levels = out_rows.shape[1]
    fields = starts.shape[0] - 1
    for i in range(ids.shape[0]):
        x = np.int64(ids[i])
        f = 0
        if fields > 1:  # binary search: the last field starting at or below x
            low, high = 0, fields - 1
            while low < high:
                mid = (low + high + 1) >> 1
                if starts[mid] <= x:
                    low = mid
                else:
                    high = mid - 1
            f = low
        bucket = bucket_of(sa * x + sb, num_buckets)
        score = np.float32(0.0)
        row = -1
        for j in range(num_slots):
            if occupied[bucket, j] and keys[bucket, j] == x:
                score = scores[bucket, j]
                row = hot_rows[bucket, j]
                break
        if row < 0:
            if direct[f]:
                row = offsets[0, f] + (x - starts[f])
            else:
                row = offsets[0, f] + bucket_of(coefficients[0, 0] * x + coefficients[0, 1], rows[0, f])
        out_rows[i, 0] = row
        if levels == 2:
            if direct[f]:
                out_rows[i, 1] = offsets[1, f] + (x - starts[f])
            else:
                out_rows[i, 1] = offsets[1, f] + bucket_of(coefficients[1, 0] * x + coefficients[1, 1], rows[1, f])
            out_weights[i, 0] = 1.0
            # hot rows come first; ids of a full field are never scored, so never medium
            out_weights[i, 1] = 1.0 if row >= offsets[0, 0] and score >= medium else 0.0


@numba.njit(cache=True, nogil=True)
def hot_candidates(ids, scores, hot, threshold, limit):
    """Positions of up to ``limit`` distinct ids scoring >= threshold without a hot row: highest score first,
    ties to the smaller id (one position per id; its occurrences share their scores)."""
    chosen = np.empty(0, dtype=np.int64)
    count = 0
    for i in range(ids.shape[0]):
        if scores[i] >= threshold and hot[i] < 0:
            count += 1
    if count == 0 or limit == 0:
        return chosen
    positions = np.empty(count, dtype=np.int64)
    count = 0
    for i in range(ids.shape[0]):
        if scores[i] >= threshold and hot[i] < 0:
            positions[count] = i
            count += 1
    positions = positions[np.argsort(ids[positions], kind="mergesort")]
    distinct = np.empty(count, dtype=np.int64)
    kept = 0
    for k in range(count):
        if kept == 0 or ids[positions[k]] != ids[distinct[kept - 1]]:
            distinct[kept] = positions[k]
            kept += 1
    distinct = distinct[:kept]
    order = np.argsort(-scores[distinct], kind="mergesort")  # stable: equal scores stay in id order
    return distinct[order[:limit]]
