"""A sketch's slots as module buffers (:class:`SketchState`, what :class:`compemb.sketch.hotsketch.HotSketch`
holds): made on a device or planned on ``meta``, kept in their dtypes wherever a parent module sends them, restored
exactly by ``state_dict``, seen by the compiled kernels through numpy views, and the decay mass followed on the
host while it is known."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from compemb.hashing import hash_coefficients

# the state, in the order the kernels take it
_BUFFERS = {
    "keys": torch.int64,
    "scores": torch.float32,
    "hot_rows": torch.int32,
    "occupied": torch.bool,
    "mass": torch.float64,
    "coefficients": torch.int64,
}


class SketchState(torch.nn.Module):
    """The buffers of ``num_buckets x slots`` slots (``keys``, ``scores``, ``hot_rows``, ``occupied``), the decay
    ``mass`` and the bucket hash's ``coefficients`` (drawn from ``seed`` and ``stream``), on ``device``."""

    keys: Tensor
    scores: Tensor
    hot_rows: Tensor
    occupied: Tensor
    mass: Tensor
    coefficients: Tensor

    def __init__(
        self, num_buckets: int, slots: int, *, seed: int, stream: int, device: torch.device | str | None
    ) -> None:
        super().__init__()
        self.num_buckets, self.slots = num_buckets, slots
        self.seed, self.stream = int(seed), int(stream)
        shape, where = (num_buckets, slots), torch.device(device or "cpu")
        self.register_buffer("keys", torch.zeros(shape, dtype=torch.int64, device=where))
        self.register_buffer("scores", torch.zeros(shape, dtype=torch.float32, device=where))
        self.register_buffer("hot_rows", torch.full(shape, -1, dtype=torch.int32, device=where))
        self.register_buffer("occupied", torch.zeros(shape, dtype=torch.bool, device=where))
        self.register_buffer("mass", torch.zeros(1, dtype=torch.float64, device=where))
        self.register_buffer("coefficients", hash_coefficients(self.seed, 1, self.stream).to(where))
        self._cache: tuple | None = None
        self._known_mass: float | None = 0.0  # ``mass`` as a host float while it is known: no device read

    def mass_since_decay(self) -> float:
        """The score mass inserted since the last decay (a host float; read from the device only after a load)."""
        if self._known_mass is None:
            self._known_mass = float(self.mass[0])
        return self._known_mass

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every slot, zero the decay mass and redraw the hash from the seed, in place."""
        self.keys.zero_()
        self.scores.zero_()
        self.hot_rows.fill_(-1)
        self.occupied.zero_()
        self.mass.zero_()
        self.coefficients.copy_(hash_coefficients(self.seed, 1, self.stream))
        self._known_mass = 0.0

    def _arrays(self) -> tuple[np.ndarray, ...]:
        # numpy views of the buffers, made once: tensor.numpy() costs ~1 us, a visible share of a batch's
        # time. They are remade when a buffer object is replaced (load_state_dict(assign=True), say).
        buffers, cache = self._buffers, self._cache
        if (
            cache is None
            or cache[0] is not buffers["keys"]
            or cache[1] is not buffers["scores"]
            or cache[2] is not buffers["hot_rows"]
            or cache[3] is not buffers["occupied"]
            or cache[4] is not buffers["mass"]
            or cache[5] is not buffers["coefficients"]
        ):
            tensors = tuple(cast(Tensor, buffers[name]) for name in _BUFFERS)  # (registered, never None)
            cache = self._cache = (*tensors, *(t.numpy() for t in tensors))
        return cache[6:]

    def _apply(self, fn: Any, recurse: bool = True) -> SketchState:
        # The buffers go where a parent module sends them (.to('cuda'), .cpu(), to_empty) but keep their dtypes
        # (.half(), .double(), ...): the kernels need them, and half-precision scores would stop counting past
        # 2048. fn is applied only to learn the device (it raises for a copy out of meta, as torch does).
        for name, dtype in _BUFFERS.items():
            tensor = self._buffers[name]
            assert tensor is not None  # every buffer is registered with a tensor
            device = fn(tensor).device
            if tensor.is_meta and device.type != "meta":
                self._buffers[name] = torch.empty(tensor.shape, dtype=dtype, device=device)
                self._known_mass = None
            elif device != tensor.device:
                self._buffers[name] = tensor.to(device)
        self._cache = None
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        device = self.keys.device
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) puts the given tensors in place: bring them back to the sketch's device
        # and their dtypes
        for name, dtype in _BUFFERS.items():
            tensor = self._buffers[name]
            assert tensor is not None  # every buffer is registered with a tensor (a load puts one in its place)
            if tensor.device != device or tensor.dtype != dtype or not tensor.is_contiguous():
                self._buffers[name] = tensor.to(device, dtype).contiguous()
        self._cache, self._known_mass = None, None

    def __getstate__(self) -> dict:
        # numpy views would be copied apart from their tensors by pickle/deepcopy: drop them
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_known_mass", None)
        self.__dict__.update(state)
