"""Seeded universal hashing of int64 tensors, identical in every process, run and device.

The family is Dietzfelbinger's multiply-add-shift on 64-bit keys: ``s = a * x + b (mod 2^64)``
with ``a`` a random odd 64-bit integer and ``b`` a random 64-bit integer; the top 32 bits of ``s``
are mapped to ``[0, m)`` by a multiply-high (``hi * m >> 32``), which avoids the cost of a division (bucket
sizes differ by at most one, as with ``%``). For distinct keys the collision probability is about ``1/m`` (at most ``2/m``: the family is
2-approximately universal). Coefficients come from SplitMix64 of ``(seed, stream)``, never from
Python's ``hash()``, so hashes do not depend on the process, the platform or the device.

Torch's int64 arithmetic wraps modulo 2^64 on CPU and CUDA, which is exactly the arithmetic the
family needs; ``tests/test_hashing.py`` checks it against a pure-Python reference.
"""

from __future__ import annotations

import numba
import torch
from torch import Tensor

MAX_BUCKETS = 2**31  # hi32 * m must fit in a signed 64-bit integer
_MASK64 = (1 << 64) - 1
_MASK32 = 0xFFFFFFFF


def splitmix64(state: int) -> int:
    """One step of SplitMix64: a well-mixed 64-bit integer from any 64-bit integer state."""
    z = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _to_signed(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def hash_coefficients(seed: int, num_functions: int, stream: int = 0) -> Tensor:
    """Draw ``(num_functions, 2)`` int64 coefficients ``(a, b)`` (``a`` odd) for ``seed`` and ``stream``.

    Different streams of one seed give independent functions (a method uses one stream per role).
    """
    if num_functions < 1:
        raise ValueError(f"num_functions must be >= 1, got {num_functions}")
    state = splitmix64((int(seed) & _MASK64) ^ splitmix64(int(stream) & _MASK64))
    values = []
    for _ in range(num_functions):
        state = splitmix64(state)
        a = state | 1
        state = splitmix64(state)
        b = state
        values.append((_to_signed(a), _to_signed(b)))
    return torch.tensor(values, dtype=torch.int64)


def coefficient_bytes(num_functions: int) -> int:
    """Bytes that ``num_functions`` hash functions store: one int64 ``(a, b)`` pair each."""
    return num_functions * 2 * 8


def _check_buckets(num_buckets: int) -> None:
    if not 1 <= num_buckets <= MAX_BUCKETS:
        raise ValueError(f"num_buckets must be in [1, {MAX_BUCKETS}], got {num_buckets}")


def _mix(ids: Tensor, coefficients: Tensor) -> Tensor:
    # a * x + b for every function at once; int64 arithmetic wraps modulo 2^64. Coefficients (F, 2) hash every id
    # with all F functions; stacked (T, F, 2) ones hash column t of ids (..., T) with table t's (table batches)
    mixed = ids.unsqueeze(-1) * coefficients[..., 0]
    return mixed.add_(coefficients[..., 1])


def hash_ids(ids: Tensor, coefficients: Tensor, num_buckets: int) -> Tensor:
    """Hash int64 ``ids`` of any shape into ``[0, num_buckets)``.

    Args:
        ids: int64 tensor, any shape, any device.
        coefficients: ``(F, 2)`` int64 from :func:`hash_coefficients` (on the device of ``ids``).
        num_buckets: the range, at most 2^31.

    Shape:
        ``(...)`` -> ``(..., F)``; all F functions are computed in one vectorised pass.
    """
    _check_buckets(num_buckets)
    # in place on the fresh intermediate: one allocation for the whole chain
    return hash_high32(ids, coefficients).mul_(num_buckets).bitwise_right_shift_(32)


def hash_high32(ids: Tensor, coefficients: Tensor) -> Tensor:
    """The top 32 bits of ``a * x + b`` as non-negative int64 in ``[0, 2^32)``; shape ``(..., F)``."""
    return _mix(ids, coefficients).bitwise_right_shift_(32).bitwise_and_(_MASK32)


def hash_signs(ids: Tensor, coefficients: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Random signs in {-1, +1} from the top bit of ``a * x + b``; shape ``(..., F)``.

    Use coefficients of their own stream: the signs must be independent of the buckets.
    """
    # the arithmetic shift leaves 0 or -1; or-ing 1 turns them into +1 or -1
    return _mix(ids, coefficients).bitwise_right_shift_(63).bitwise_or_(1).to(dtype)


@numba.njit(inline="always")
def bucket_of(mixed: int, num_buckets: int) -> int:
    """In compiled kernels: the bucket of ``mixed = a * x + b`` (int64, wrapped), exactly as :func:`hash_ids`."""
    return ((mixed >> 32) & 0xFFFFFFFF) * num_buckets >> 32


def reference_hash(key: int, a: int, b: int, num_buckets: int) -> int:
    """Pure-Python definition of one hash value (for tests and other-language ports)."""
    mixed = (a * key + b) & _MASK64
    return ((mixed >> 32) * num_buckets) >> 32


class UniversalHash(torch.nn.Module):
    """``F`` seeded hash functions of int64 ids into ``[0, num_buckets)``, as a module.

    The coefficients are a buffer, so they move with ``.to(device)`` and are saved in ``state_dict``.

    Args:
        num_buckets: the range of every function (at most 2^31).
        num_functions: how many independent functions (F).
        seed: the seed; ``stream`` separates roles that share a seed.

    Shape:
        ids ``(...)`` -> ``(..., F)`` int64.

    Example::

        >>> h = UniversalHash(1000, num_functions=2, seed=7)
        >>> h(torch.tensor([1, -5, 2**40])).shape
        torch.Size([3, 2])
    """

    coefficients: Tensor

    def __init__(
        self,
        num_buckets: int,
        num_functions: int = 1,
        seed: int = 0,
        stream: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_buckets(num_buckets)
        self.num_buckets = int(num_buckets)
        self.num_functions = int(num_functions)
        self.seed, self.stream = int(seed), int(stream)
        self.register_buffer("coefficients", torch.empty(num_functions, 2, dtype=torch.int64, device=device))
        self.reset()

    @torch.no_grad()
    def reset(self, seed: int | None = None) -> None:
        """Redraw the coefficients from ``seed`` (default: the seed it was built with), in place."""
        if seed is not None:
            self.seed = int(seed)
        if not self.coefficients.is_meta:
            self.coefficients.copy_(hash_coefficients(self.seed, self.num_functions, self.stream))

    def forward(self, ids: Tensor) -> Tensor:
        """Buckets of ``ids``: ``(...)`` -> ``(..., F)`` int64 in ``[0, num_buckets)``."""
        return hash_ids(ids, self.coefficients, self.num_buckets)

    def signs(self, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Signs in {-1, +1} of ``ids`` from these functions (ignores ``num_buckets``): ``(...)`` -> ``(..., F)``."""
        return hash_signs(ids, self.coefficients, dtype)

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, num_functions={self.num_functions}"
