"""The rows a sparse gradient names, summed, and the row-wise write of an update: what every row-wise optimizer
of :mod:`compemb.optim` does with a sparse gradient before and after its own arithmetic."""

from __future__ import annotations

import torch
from torch import Tensor

from compemb.kernels import device_path


def unique_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The rows a sparse 2-D gradient names, ascending, and each one's summed gradient (``coalesce()``'s result,
    several times faster on CPU: the sort runs on int32 row numbers where they fit).

    On the device code path (:mod:`compemb.kernels`) the result has a fixed size instead, one slot per entry of
    the gradient, so the host never waits to learn how many rows there are (see :func:`segment_rows`).
    """
    indices, values = grad._indices()[0], grad._values()
    if device_path(indices):
        return segment_rows(indices, values)
    narrow = indices.int() if grad.shape[0] < 2**31 else indices
    rows, inverse = torch.unique(narrow, return_inverse=True)
    summed = values.new_zeros(rows.numel(), *values.shape[1:]).index_add_(0, inverse, values)
    return rows.long(), summed


def segment_rows(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`unique_rows` in fixed shapes: ``len(indices)`` slots, the distinct rows ascending in the first ones
    with their summed values (summed in the entries' order, as ``unique_rows`` sums), every later slot a copy of
    the last distinct one.

    The copies make a row-wise update safe without knowing the count: a slot that repeats the last row computes
    exactly its new values, so writing them back with ``index_copy_`` writes the same value twice (what fused
    table-batched optimizers do with a padding row, without one). Sort, segment boundaries, a cumulative sum and
    scatters: no op whose output size depends on the data.
    """
    if indices.numel() == 0:
        return indices.long(), values
    sorted_rows, order = torch.sort(indices, stable=True)  # stable: equal rows keep the entries' order
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[1:] = sorted_rows[1:] != sorted_rows[:-1]
    segment = torch.cumsum(starts, 0) - 1  # each entry's slot
    summed = values.new_zeros(values.shape).index_add_(0, segment, values.index_select(0, order))
    rows = torch.empty_like(sorted_rows).scatter_(0, segment, sorted_rows)
    slot = torch.minimum(torch.arange(segment.numel(), device=segment.device), segment[-1])  # past the last: the last
    return rows.index_select(0, slot).long(), summed.index_select(0, slot)


def add_to_rows(param: Tensor, rows: Tensor, update: Tensor, alpha: float) -> None:
    """``param[rows] += alpha * update``. Rows from :func:`segment_rows` may repeat the last one (with the same
    update): those are written, not added, so the repeats change nothing."""
    if device_path(rows):
        param.index_copy_(0, rows, param.index_select(0, rows).add_(update, alpha=alpha))
    else:
        param.index_add_(0, rows, update, alpha=alpha)
