"""One-pass statistics for checking ids and bags: compiled with numba on CPU, plain torch elsewhere.

A lookup of one feature's 2,048 ids costs only tens of microseconds, so the few tensor ops that checking
its offsets and id range takes in torch were a quarter of it inside a training step. On CPU one compiled
pass over the offsets and ids replaces them; other devices use the torch path, which gives the same values.
"""

from __future__ import annotations

import os

import numba
import numpy as np
import torch
from torch import Tensor

from compemb.kernels import on_host


@numba.njit(nogil=True, cache=True)
def _scan(offsets: np.ndarray, num_ids: int, ids: np.ndarray, want_range: bool) -> tuple[int, int, int, int]:
    first = offsets[0]
    smallest = num_ids - offsets[-1]
    for index in range(1, offsets.shape[0]):
        smallest = min(smallest, offsets[index] - offsets[index - 1])
    low = high = 0
    if want_range and ids.shape[0] > 0:
        low = high = ids[0]
        for value in ids:
            low = min(low, value)
            high = max(high, value)
    return first, smallest, low, high


def scan_bags(ids: Tensor, offsets: Tensor, want_range: bool) -> tuple[int, int, int, int]:
    """``offsets[0]``, the smallest bag size, and the smallest and largest id (0, 0 unless ``want_range``).

    The smallest bag size is negative when offsets decrease or the last one is beyond the ids. ``ids`` and
    ``offsets`` are 1-D int64 and ``offsets`` is not empty.
    """
    if on_host(ids, offsets):
        first, smallest, low, high = _scan(offsets.numpy(), ids.numel(), ids.numpy(), want_range)
        return int(first), int(smallest), int(low), int(high)
    return scan_bags_torch(ids, offsets, want_range)


def scan_bags_torch(ids: Tensor, offsets: Tensor, want_range: bool) -> tuple[int, int, int, int]:
    """:func:`scan_bags` in tensor ops, for any device (one synchronisation)."""
    sizes = torch.diff(offsets, append=offsets.new_full((1,), ids.numel()))
    stats = [offsets[0], sizes.min()]
    if want_range and ids.numel() > 0:
        stats += list(torch.aminmax(ids))
    values = torch.stack(stats).tolist()
    return (*values, 0, 0) if len(values) == 2 else tuple(values)


def id_range(ids: Tensor) -> tuple[int, int]:
    """The smallest and largest of non-empty int64 ``ids`` (any shape)."""
    if on_host(ids):
        flat = ids.reshape(-1)
        _, _, low, high = _scan(np.zeros(1, dtype=np.int64), 0, flat.numpy(), True)
        return int(low), int(high)
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    return low, high


def assert_ids_in_range(ids: Tensor, sizes: Tensor | int, what: str) -> None:
    """Where ids live on an accelerator: fail unless ``0 <= ids < sizes`` (``sizes`` broadcasts against ``ids``),
    as a device-side assert, so the check queues with the lookup instead of making the host wait for it. The error
    surfaces at the next synchronisation (on CPU at once) and names ``what``, not the id: finding the id would be
    the wait the assert avoids."""
    inside = ((ids >= 0) & (ids < sizes)).all()
    torch._assert_async(inside, device_assert_message(f"compemb: an id of {what} is outside its range [0, n)"))


# CUDA refuses a device-side assert whose message has 255 characters or more (a RuntimeError at the call)
MAX_DEVICE_MESSAGE = 254


def device_assert_message(message: str) -> str:
    """``message`` cut to what a device-side assert accepts (:data:`MAX_DEVICE_MESSAGE` characters), ``...`` marking
    the cut: whatever names it holds (26 features' tables, say), the assert itself never fails."""
    if len(message) <= MAX_DEVICE_MESSAGE:
        return message
    return message[: MAX_DEVICE_MESSAGE - 3] + "..."


def machine_memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say): what a refusal compares with."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
