"""Which code a step runs: compiled CPU kernels where they help, or the torch ops an accelerator runs.

compemb's methods have two implementations of their bookkeeping (id checks, HotSketch, CAFE's and CCE's routing):
numba kernels over numpy views of CPU tensors, and torch ops for tensors on an accelerator, which leave the device
only where a method's algorithm needs the host. ``"auto"`` picks by device. ``"torch"`` takes the device code path
on CPU too: a CPU step then runs exactly what a CUDA step runs (device-side range checks, no numba, no host copies),
so the path can be tested, and its host synchronisations counted (``compemb bench syncs``), without a GPU.

Example::

    >>> with use_kernels("torch"):
    ...     device_path(torch.zeros(3))
    True
    >>> device_path(torch.zeros(3))
    False
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch  # noqa: F401  (the doctest's namespace)
from torch import Tensor

KERNELS = ("auto", "torch")

_mode = "auto"


def current_kernels() -> str:
    """The kernels in force: ``"auto"`` or ``"torch"``."""
    return _mode


def set_kernels(mode: str) -> None:
    """Choose the kernels for what follows (a process-wide setting; :func:`use_kernels` scopes it)."""
    global _mode
    if mode not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {mode!r}")
    _mode = mode


@contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Run the body with ``mode``'s kernels, then restore the previous choice."""
    previous = _mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(previous)


def device_path(*tensors: Tensor) -> bool:
    """Whether work on ``tensors`` takes the device code path: any of them off the CPU, or ``"torch"`` kernels."""
    return _mode == "torch" or any(tensor.device.type != "cpu" for tensor in tensors)


def on_host(*tensors: Tensor) -> bool:
    """Whether the compiled CPU kernels may run on ``tensors`` (all on the CPU, ``"auto"`` kernels)."""
    return not device_path(*tensors)


__all__ = ["KERNELS", "current_kernels", "device_path", "on_host", "set_kernels", "use_kernels"]
