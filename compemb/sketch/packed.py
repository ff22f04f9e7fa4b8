"""Many tables' HotSketches in one flat set of buffers, so one vectorised merge takes every table's batch.

A per-feature collection of CAFE tables has a sketch per table; on a device each insert is a few dozen kernels, so
26 tables cost 26 times that. :class:`PackedSketches` lays the sketches' buckets end to end (table t's buckets
offset by those before it, as table-batched embeddings lay out rows) and makes each sketch's buffers views of the
flat ones: every sketch stays what it is (its ``state_dict``, queries and hot rows), and :meth:`PackedSketches.insert`
hashes every column at once and runs one :func:`~compemb.sketch.torch_ops.merge_insert` over the flat buckets, which
gives each sketch exactly what its own merge would (tested bit for bit). The decay stays per sketch, decided on the
host from the mass each batch counts (nothing is read back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compemb.hashing import hash_high32
from compemb.sketch import torch_ops
from compemb.sketch.hotsketch import HotSketch
from compemb.table_batch import PackedBuffers

_PACKED = ("keys", "scores", "hot_rows", "occupied", "mass")


class PackedSketches:
    """HotSketches of one slot count on one device, their buckets end to end in one set of buffers.

    Args:
        sketches: the tables' sketches, in column order (their buffers become views of the packed ones).

    Example::

        >>> sketches = [HotSketch(8, threshold=2.0, seed=s, backend="merge") for s in range(3)]
        >>> packed = PackedSketches(sketches)
        >>> packed.insert(torch.tensor([[1, 1, 7], [1, 2, 7]]), masses=[2.0, 2.0, 2.0])
        [0, 0, 0]
        >>> sketches[0].query(torch.tensor([1]))[0], sketches[2].query(torch.tensor([7]))[0]
        (tensor([2.]), tensor([2.]))
    """

    def __init__(self, sketches: Sequence[HotSketch]) -> None:
        if not sketches:
            raise ValueError("PackedSketches needs at least one sketch")
        first = sketches[0]
        if any(
            s.slots != first.slots or s.keys.device != first.keys.device or s.skip_hot != first.skip_hot
            for s in sketches
        ):
            raise ValueError("packed sketches must have one slot count and newcomer rule and live on one device")
        self.sketches = list(sketches)
        self.packs = {name: PackedBuffers(self.sketches, name) for name in _PACKED}
        self._packed()

    def pack(self) -> None:
        """Copy the sketches' buffers into flat ones and make each sketch's buffers its slices of them."""
        for pack in self.packs.values():
            pack.pack()
        self._packed()

    def _packed(self) -> None:
        self.starts = self.packs["keys"].starts
        for sketch in self.sketches:
            sketch._cache = None
        self.buffers: dict[str, Tensor] = {name: pack.buffer for name, pack in self.packs.items()}
        device = self.buffers["keys"].device
        self.offsets = torch.tensor(self.starts, dtype=torch.int64, device=device).view(1, -1)
        self.sizes = torch.tensor([s.num_buckets for s in self.sketches], dtype=torch.int64, device=device).view(-1, 1)
        # the decay on the device (mass_on_device): each sketch's period and factor, and each bucket's sketch
        self.decay_periods = torch.tensor([s.decay_period for s in self.sketches], dtype=torch.float64, device=device)
        self.decay_factors = torch.tensor([s.decay_factor for s in self.sketches], dtype=torch.float64, device=device)
        self.bucket_sketch = torch.repeat_interleave(
            torch.arange(len(self.sketches), device=device), self.sizes.view(-1)
        ).view(-1, 1)
        self._masses: tuple[tuple[float, ...], Tensor] | None = None

    def is_packed(self) -> bool:
        """Whether every sketch's buffers still lie at their places in the flat ones."""
        return all(pack.is_packed() for pack in self.packs.values())

    def ensure_packed(self) -> None:
        """Pack again if any sketch's buffer moved or was replaced since."""
        if not self.is_packed():
            self.pack()

    def buckets(self, ids: Tensor) -> Tensor:
        """The flat bucket of every entry of ``ids`` ``(batch, tables)``: column t hashed by sketch t, offset by
        the buckets before it."""
        coefficients = torch.stack([s.coefficients for s in self.sketches])  # (tables, 1, 2)
        buckets = hash_high32(ids, coefficients).squeeze(-1).mul_(self.sizes.view(1, -1)).bitwise_right_shift_(32)
        return buckets.add_(self.offsets)

    def locate(self, ids: Tensor) -> Tensor:
        """The flat slot (bucket x slots + slot) of every entry of ``ids`` ``(batch, tables)`` in its column's
        sketch, -1 where absent."""
        self.ensure_packed()
        keys, occupied = self.buffers["keys"], self.buffers["occupied"]
        bucket = self.buckets(ids)
        match = (keys[bucket] == ids.unsqueeze(-1)) & occupied[bucket]
        slot = match.to(torch.uint8).argmax(-1)  # the first match; there is at most one
        return torch.where(match.any(-1), bucket * keys.shape[1] + slot, -1)

    @torch.no_grad()
    def query(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Scores (float32) and hot rows (int32) of ``ids`` ``(batch, tables)``, column t in sketch t: exactly
        each sketch's :meth:`HotSketch.query` of its column (0 and -1 where absent)."""
        where = self.locate(ids)
        found, at = where >= 0, where.clamp_min(0)
        scores = torch.where(found, self.buffers["scores"].view(-1)[at], 0.0)
        hot = torch.where(found, self.buffers["hot_rows"].view(-1)[at], -1)
        return scores, hot

    @torch.no_grad()
    def insert(
        self,
        ids: Tensor,
        scores: Tensor | None = None,
        masses: Sequence[float] | Tensor | None = None,
        keep: Tensor | None = None,
    ) -> list[int]:
        """Column t of ``ids`` ``(batch, tables)`` into sketch t, all in one merge; returns each sketch's decays.

        ``scores`` (the shape of ``ids``, or None: 1 per occurrence) and ``keep`` as :meth:`HotSketch.insert`;
        ``masses[t]``: what column t counts towards sketch t's decay (default: its number of kept entries, which
        must then be known: ``keep`` None); a device tensor of them decides the decays on the device (the sketches
        must have ``mass_on_device``). Scores are not checked here (finite, >= 0).
        """
        self.ensure_packed()
        if ids.dim() != 2 or ids.shape[1] != len(self.sketches):
            raise ValueError(f"ids must have shape (batch, {len(self.sketches)}), got {tuple(ids.shape)}")
        if masses is None:
            if keep is not None:
                raise ValueError("with keep, give each sketch's mass (how many of its entries are kept)")
            masses = [float(ids.shape[0])] * len(self.sketches)
        device = self.buffers["keys"].device
        ids = ids.to(device, torch.int64)
        buckets = self.buckets(ids)
        values = (
            torch.ones(ids.shape, dtype=torch.float32, device=device)
            if scores is None
            else scores.to(device, torch.float32)
        )
        torch_ops.merge_insert(
            ids.reshape(-1),
            values.reshape(-1),
            None if keep is None else keep.reshape(-1),
            self.buffers["keys"],
            self.buffers["scores"],
            self.buffers["hot_rows"],
            self.buffers["occupied"],
            None,
            buckets=buckets.reshape(-1),
            skip_hot=self.sketches[0].skip_hot,
        )
        if isinstance(masses, Tensor) and not self.sketches[0].mass_on_device:
            raise ValueError("masses on the device need sketches with mass_on_device")
        if self.sketches[0].mass_on_device:
            return self._decay_on_device(masses if isinstance(masses, Tensor) else [float(mass) for mass in masses])
        return [
            sketch._decay_by(sketch.mass_since_decay() + float(mass)) for sketch, mass in zip(self.sketches, masses)
        ]

    def _decay_on_device(self, masses: list[float] | Tensor) -> list[int]:
        """Every sketch's decay rule (:meth:`HotSketch._decay_on_device`) at once, the masses on the device: -1 each
        (the host does not know)."""
        if isinstance(masses, Tensor):
            counted = masses
        else:
            if self._masses is None or self._masses[0] != tuple(masses):  # made once for a batch shape, not per step
                self._masses = (tuple(masses), torch.tensor(masses, dtype=torch.float64).to(self.decay_periods.device))
            counted = self._masses[1]
        mass = self.buffers["mass"]
        mass.add_(counted.to(mass.dtype))
        over = mass > self.decay_periods
        scale = torch.where(over, self.decay_factors, 1.0)
        scores = self.buffers["scores"]
        scores.copy_((scores.double() * scale[self.bucket_sketch]).float())
        mass.masked_fill_(over, 0.0)
        for sketch in self.sketches:
            sketch._known_mass = None
        return [-1] * len(self.sketches)
