"""Where a CAFE table's rows lie and which row an id reads: hot rows first, then each field's level-1 rows (hashed,
or its own in a field kept full), then each compressed field's level-2 rows (cafe-ml); the field tables
(``field_starts``, ``field_direct``, ``field_rows``, ``field_offsets``) say where. The sizes come from
:mod:`compemb.embeddings.cafe.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import Tensor

from compemb.embeddings.cafe.kernels import cafe_rows
from compemb.embeddings.fields import split_rows
from compemb.hashing import UniversalHash, hash_high32
from compemb.kernels import on_host

if TYPE_CHECKING:
    from compemb.sketch.hotsketch import HotSketch

LOWEST_ID = -(2**63)  # the first field of one vocabulary starts here: any int64 id is in it
_NO_WEIGHTS = np.empty((0, 2), dtype=np.float32)


@dataclass(frozen=True)
class FieldLayout:
    """Where each field's rows lie in the stored table."""

    tables: dict[str, Tensor]  # field_starts, field_direct, field_rows, field_offsets (CPU)
    level_starts: tuple[int, int]  # where level 1 and level 2 begin (reset_tables zeroes level 2)
    total_rows: int


def lay_out_fields(
    fields: list[tuple[int, bool]],
    hot_rows: int,
    hashed_rows: tuple[int, ...],
    field_tables: bool,
    one_vocabulary: bool,
) -> FieldLayout:
    """Rows of the stored table: hot rows, then each field's level-1 rows (hashed, or its own when kept full), then
    each compressed field's level-2 rows (cafe-ml). The field tables say where."""
    levels, compressed = len(hashed_rows), [n for n, full in fields if not full]
    shares = [split_rows(rows, compressed) for rows in hashed_rows]  # each compressed field's rows per level
    rows = torch.zeros(levels, len(fields), dtype=torch.int64)
    offsets = torch.zeros(levels, len(fields), dtype=torch.int64)
    at, taken, level_starts = hot_rows, [0] * levels, []
    for level in range(levels):
        level_starts.append(at)
        if not field_tables:  # every field reads the same hashed table, keyed by its ids' offsets
            rows[level], offsets[level], at = hashed_rows[level], at, at + hashed_rows[level]
            continue
        for f, (n, full) in enumerate(fields):
            if full and level == 1:  # a full field's ids are never medium: level 2 repeats level 1, weight 0
                rows[1, f], offsets[1, f] = rows[0, f], offsets[0, f]
                continue
            rows[level, f] = n if full else shares[level][taken[level]]
            taken[level] += 0 if full else 1
            offsets[level, f], at = at, at + int(rows[level, f])
    # one vocabulary: one field over every int64 id; with blocks field f starts at the sum of those before it
    starts = (
        torch.tensor([LOWEST_ID, 2**63 - 1])
        if one_vocabulary
        else torch.tensor([0, *np.cumsum([n for n, _ in fields]).tolist()])
    )
    tables = {
        "field_starts": starts,
        "field_direct": torch.tensor([full for _, full in fields]),
        "field_rows": rows,
        "field_offsets": offsets,
    }
    return FieldLayout(tables, (hot_rows, level_starts[-1]), at)


class FieldRouting:
    """The rows a CAFE table's ids read (a mixin of the CAFE classes, :mod:`compemb.embeddings.cafe.embedding`):
    its field tables as buffers, and each id's hot row (the sketch's) or its field's rows at each level."""

    # the field tables, buffers registered by _lay_out_fields
    field_starts: Tensor
    field_direct: Tensor
    field_rows: Tensor
    field_offsets: Tensor

    if TYPE_CHECKING:  # what the CAFE table (the host class) provides
        hot_rows: int
        hashed_rows: tuple[int, ...]
        field_tables: bool
        blocks: list[int] | None
        levels: int
        medium_fraction: float
        threshold: float
        sketch: HotSketch
        hashes: torch.nn.ModuleList  # of UniversalHash, one per level

        def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None: ...

    def _lay_out_fields(self, fields: list[tuple[int, bool]], device: torch.device | str | None) -> int:
        """The field tables (:func:`lay_out_fields`) as buffers; the total rows."""
        layout = lay_out_fields(fields, self.hot_rows, self.hashed_rows, self.field_tables, self.blocks is None)
        # derived from the sizes alone, so not saved; kept on the CPU too, to be written again after a meta build
        self._field_layout = layout.tables
        for name, value in self._field_layout.items():
            self.register_buffer(name, value.to(device, copy=True), persistent=False)
        self._offsets = layout.level_starts  # where level 1 and level 2 begin (reset_tables zeroes level 2)
        self._has_full_fields = any(full for _, full in fields)
        return layout.total_rows

    def _route(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows ``(N, levels)`` of each id, and with two levels their weights ``(N, 2)``: 1, and 1 if medium."""
        if not (on_host(ids) and self.sketch._compiled):
            return self._route_torch(ids)
        # on CPU one compiled pass over the sketch and the hashes (5x faster than the torch ops)
        rows = torch.empty(ids.numel(), self.levels, dtype=torch.int64)
        weights = torch.empty(ids.numel(), 2) if self.levels == 2 else None
        keys, scores, hot, occupied, _, sketch_coefficients = self.sketch._arrays()
        cafe_rows(
            ids.numpy(),
            keys,
            scores,
            hot,
            occupied,
            sketch_coefficients,
            np.concatenate([cast(UniversalHash, h).coefficients.numpy() for h in self.hashes]),
            self.field_starts.numpy(),
            self.field_direct.numpy(),
            self.field_rows.numpy(),
            self.field_offsets.numpy(),
            self.medium_fraction * self.threshold,
            rows.numpy(),
            _NO_WEIGHTS if weights is None else weights.numpy(),
        )
        return rows, weights

    def _fields(self, ids: Tensor) -> Tensor:
        """Each id's field (0 for every id of one vocabulary)."""
        return torch.searchsorted(self.field_starts[1:-1], ids.contiguous(), right=True)  # (a column: strided)

    def _shared_row(self, ids: Tensor, level: int, field: Tensor | None = None) -> Tensor:
        """The row ``ids`` read at ``level`` when not hot: their field's hashed row, or their own in a full field
        (``field``: the ids' fields, when already known)."""
        field = self._fields(ids) if field is None else field
        rows, start = self.field_rows[level, field], self.field_offsets[level, field]
        bucket = (
            hash_high32(ids, cast(UniversalHash, self.hashes[level]).coefficients)
            .squeeze(-1)
            .mul_(rows)
            .bitwise_right_shift_(32)
        )
        if not self._has_full_fields:
            return start + bucket
        return start + torch.where(self.field_direct[field], ids - self.field_starts[field], bucket)

    def _route_torch(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`_route` in torch ops, reading the sketch where it lives (with the weights: no trip to the host)."""
        score, hot = self.sketch.query(ids)
        hot = hot.long()
        field = self._fields(ids)
        first = torch.where(hot >= 0, hot, self._shared_row(ids, 0, field))
        if self.levels == 1:
            return first.unsqueeze(-1), None
        second = self._shared_row(ids, 1, field)
        medium = (hot < 0) & (score >= self.medium_fraction * self.threshold)
        return torch.stack([first, second], -1), torch.stack([torch.ones_like(score), medium.to(score.dtype)], -1)
