"""Per-feature CCE tables looked up together on the device code path.

A per-feature collection has a CCE table per large feature; looked up one at a time each is two hashes, a range
check, a routing and a gather (a few dozen kernels with Python around them), 8 tables 8 times that.
:class:`CCETables` routes every table's column of ids at once where the tables are hashed (mode 0, before the first
clustering) or every id holds pointers (mode 1: cce, cce-paper): every table's hashes in one pass
(:func:`~compemb.table_batch.hash_columns`), the pointer tables packed end to end
(:class:`~compemb.table_batch.PackedBuffers`) and read with one gather, the weights packed
(:class:`~compemb.table_batch.PackedWeights`) and read with one gather, each (id, column) the sum of its T0 and T1
rows as each table's ``embedding_bag`` sums them: the same vectors, bit for bit. Each table's own bookkeeping
(gradient hooks, frequency counts, its sketch) is done as its own lookup does it.

Pointer tables of different dtypes (each table's k chooses uint8 or int16) are read one gather each. On the host
(the compiled kernels), where the tables' modes differ, or in mode 2 (cce-hybrid's holders, searched in each
table's own sorted id list), each table looks itself up
(:class:`~compemb.table_batch.SeparateLookups`, weights still packed: one optimizer update).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

from compemb import distributed
from compemb.embeddings.id_map import NO_ID
from compemb.kernels import device_path
from compemb.sketch.packed import PackedSketches
from compemb.table_batch import IdRanges, PackedBuffers, SeparateLookups, column_sizes, hash_columns


class CCETables:
    """CCE tables of one class (one ``sparse``) as one table batch; see the module docstring."""

    def __init__(self, tables: Sequence[Any]) -> None:  # compemb.embeddings.cce.embedding.CCEmbedding tables
        self.tables = list(tables)
        self.separate = SeparateLookups(self.tables, ["weight"])
        self.pack = self.separate.packs[0]
        self.ranges = IdRanges(self.tables)
        first = self.tables[0]
        self.uniform = all(t.columns == first.columns and t.embedding_dim == first.embedding_dim for t in self.tables)
        dtypes = {t.pointer_table.dtype for t in self.tables}
        self.pointers = PackedBuffers(self.tables, "pointer_table") if len(dtypes) == 1 and self.uniform else None
        self._constants: dict[str, Tensor] | None = None
        self.sketches: PackedSketches | None = None  # every table's sketch, packed at the first count (_count)
        self._holders: tuple[tuple[int, ...], Tensor] | None = None  # (the tables' rounds, every holder id)

    def _constants_on(self, device: torch.device) -> dict[str, Tensor]:
        """Per-table sizes and offsets as ``(tables, 1)`` or ``(tables, c)`` tensors on ``device`` (made once)."""
        if self._constants is None or self._constants["rows"].device != device:
            tables, c = self.tables, self.tables[0].columns
            rows = column_sizes([t.rows for t in tables], device)
            self._constants = {
                "rows": rows,
                "cold_offset": column_sizes([t.cold_offset for t in tables], device),
                "h0_buckets": column_sizes([t.h0.num_buckets for t in tables], device),
                "h1_buckets": column_sizes([t.h1.num_buckets for t in tables], device),
                "cold1_buckets": column_sizes(
                    [(t.h1 if t.cold1 is None else t.cold1).num_buckets for t in tables], device
                ),
                "column_offsets": torch.arange(c, device=device).view(1, -1) * rows,  # column j of T0: j * k
                "second_table": rows * c,  # T1's columns follow T0's
                # where each table's pointer rows start in the packed pointer tables (and its holders' ids in
                # _holder_ids: one entry per pointer row)
                "pointer_starts": torch.tensor(
                    list(accumulate([0] + [t.pointer_table.shape[0] for t in tables][:-1])),
                    dtype=torch.int64,
                    device=device,
                ),
                "pointer_last": torch.tensor(
                    [t.pointer_table.shape[0] - 1 for t in tables], dtype=torch.int64, device=device
                ),
                "id_bases": torch.tensor(
                    list(accumulate([0] + [t.num_embeddings + 1 for t in tables][:-1])),
                    dtype=torch.int64,
                    device=device,
                ),
            }
        return self._constants

    def _mode(self) -> int | None:
        """The tables' common routing mode where one pass can route them all, else None."""
        modes = {t._mode() for t in self.tables}
        if len(modes) != 1 or not self.uniform:
            return None
        return modes.pop()

    def __call__(self, ids: Tensor) -> Tensor:
        mode = self._mode() if device_path(ids, self.tables[0].weight) else None
        if mode is None:
            return self.separate(ids)
        self.ranges.check(ids)
        gradient = [j for j, t in enumerate(self.tables) if t._records and t.importance == "gradient"]
        for j in gradient:  # (AdaptiveEmbedding.lookup: what the last backward recorded applies now)
            if self.tables[j].training:
                self.tables[j]._flush()
        vectors = self._vectors(ids, mode)
        if vectors.requires_grad:
            if any(self.tables[j].training for j in gradient):
                vectors.register_hook(lambda grad: self._record(ids, grad, gradient))
            counting = [
                j for j, t in enumerate(self.tables) if t._records and t.importance != "gradient" and t.training
            ]
            if counting and self._count_together(counting):
                self._count(ids)
            else:
                for j in counting:  # frequency: count the ids now, as the table's lookup does
                    self.tables[j]._update(distributed.gather_scored(ids[:, j], None)[0], None, None)
        return vectors

    def _count_together(self, counting: list[int]) -> bool:
        """Whether every table counts frequencies into a sketch of one slot count and stride, in one process: then
        one merge takes every column (:meth:`_count`)."""
        tables = self.tables
        if len(counting) != len(tables) or distributed.active() or any(t.sketch is None for t in tables):
            return False
        return len({(t.sketch_stride, t.sketch.slots, t.sketch.skip_hot) for t in tables}) == 1

    @torch.no_grad()
    def _count(self, ids: Tensor) -> None:
        """Every table's ids counted into its sketch in one merge over the packed sketches: each column's strided
        sample (its start its sketch's mass mod the stride, read on the device, as ``mass_on_device`` tables read
        it), then each table's seen bitmap. The same sketches as each table's own insert, bit for bit."""
        if self.sketches is None or not self.sketches.is_packed():
            for table in self.tables:  # (the masses stay on the device from now: the host never reads them back)
                table.sketch.mass_on_device = True
            self.sketches = PackedSketches([table.sketch for table in self.tables])
        stride, rows = self.tables[0].sketch_stride, ids.shape[0]
        if stride > 1:
            start = self.sketches.buffers["mass"].long() % stride  # (tables,)
            positions = start + torch.arange(-(-rows // stride), device=ids.device).unsqueeze(1) * stride
            keep = positions < rows
            sample = ids.gather(0, positions.clamp_max(rows - 1))
            scores = torch.full(sample.shape, float(stride), device=ids.device)
            self.sketches.insert(sample, scores, masses=keep.sum(0, dtype=torch.float64) * stride, keep=keep)
        else:
            self.sketches.insert(ids, None, masses=[float(rows)] * len(self.tables))
        for j, table in enumerate(self.tables):
            if table.seen is not None:
                table._mark_seen(ids[:, j])

    def _pointers(self, rows: Tensor, constants: dict[str, Tensor]) -> Tensor:
        """Row ``rows[:, j]`` of table j's pointer table, every column ``(batch, tables, c)`` int64."""
        if self.pointers is not None:  # one gather from the packed pointer tables
            flat = self.pointers.flat()
            return flat.index_select(0, (rows + constants["pointer_starts"]).view(-1)).view(*rows.shape, -1).long()
        # pointer tables of several dtypes (uint8, int16: each table's k) cannot share a buffer; a row outside a
        # table (an id no holder matched, whose pointer is not used) is read at its nearest row
        rows = torch.minimum(rows.clamp_min(0), constants["pointer_last"])
        return torch.stack([t.pointer_table[rows[:, j]].long() for j, t in enumerate(self.tables)], dim=1)

    def _holder_ids(self, device: torch.device) -> Tensor:
        """Every table's sorted holder ids in one ascending array, table t's shifted by ``id_bases[t]`` (the sizes
        plus one of the tables before it) and its free entries at ``id_bases[t] + n_t``, a value no id takes: one
        search finds any column's ids. Made again when a clustering changed them (the tables' rounds)."""
        rounds = tuple(t.rounds for t in self.tables)
        if self._holders is None or self._holders[0] != rounds or self._holders[1].device != device:
            bases = accumulate([0] + [t.num_embeddings + 1 for t in self.tables][:-1])  # (id_bases, on the host)
            parts = [
                torch.where(t.holder_ids == NO_ID, t.num_embeddings, t.holder_ids).to(device) + base
                for t, base in zip(self.tables, bases)
            ]
            self._holders = (rounds, torch.cat(parts))
        return self._holders[1]

    def _record(self, ids: Tensor, grad: Tensor | None, gradient: list[int]) -> None:
        for j in gradient:
            if self.tables[j].training:
                self.tables[j]._record(ids[:, j], None if grad is None else grad[:, j])

    def _vectors(self, ids: Tensor, mode: int) -> Tensor:
        """Every table's vectors of its column of ``ids`` ``(batch, tables)`` -> ``(batch, tables, d)``."""
        tables, constants = self.tables, self._constants_on(ids.device)
        if mode == 1:  # every id's T0 pointer stored, T1's hashed
            first = self._pointers(ids, constants)
            second = hash_columns(ids, [t.h1 for t in tables], constants["h1_buckets"])
        else:  # ids without stored pointers: both hashed into the cold region
            first = hash_columns(ids, [t.h0 for t in tables], constants["h0_buckets"]).add_(constants["cold_offset"])
            second = hash_columns(
                ids, [t.h1 if t.cold1 is None else t.cold1 for t in tables], constants["cold1_buckets"]
            ).add_(constants["cold_offset"])
        if mode == 2:  # the holders' pointers (cce-hybrid's top ids): found in every table's sorted ids at once
            holders = self._holder_ids(ids.device)
            wanted = ids + constants["id_bases"]
            position = torch.searchsorted(holders, wanted).clamp_max_(holders.numel() - 1)
            found = (holders[position] == wanted).unsqueeze(-1)
            first = torch.where(found, self._pointers(position - constants["pointer_starts"], constants), first)
            second = torch.where(found, hash_columns(ids, [t.h1 for t in tables], constants["h1_buckets"]), second)
        offsets = constants["column_offsets"]
        rows = torch.stack([first + offsets, second + offsets + constants["second_table"]], dim=-1)
        rows = rows.view(*ids.shape, -1).add_(self.pack.row_offsets.view(1, -1, 1))  # (batch, tables, 2c)
        pairs = self.pack.gather(rows)  # (batch, tables, 2c, d / c)
        pairs = pairs.view(*ids.shape, tables[0].columns, 2, pairs.shape[-1])
        return (pairs[..., 0, :] + pairs[..., 1, :]).reshape(*ids.shape, tables[0].embedding_dim)
