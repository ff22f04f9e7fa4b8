"""Which rows of a CCE table each id reads (:class:`PointerRouting`, a mixin of
:class:`~compemb.embeddings.cce.embedding.CCEmbedding`), and the gather of T0's and T1's rows per column.

Before the first clustering every pointer is a seeded hash; after it an id with stored pointers reads its centroids
(T0) and the residual its ``h1`` picks (T1), the others their hashed region. On CPU one compiled pass
(:mod:`compemb.embeddings.cce.kernels`), elsewhere torch ops that give the same rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.embeddings.cce.kernels import NO_HOLDERS, PairGather, Routing, route_rows
from compemb.kernels import on_host

if TYPE_CHECKING:
    from compemb.hashing import UniversalHash


class PointerRouting:
    """Routing through a CCE table's pointers and hashes (``pointer_table``, ``holder_ids``, ``h0``, ``h1``,
    ``cold1``) to its float tables (``weight``: T0's columns, then T1's)."""

    # what the host table (CCEmbedding) provides: its sizes, tables, pointers and hashes
    embedding_dim: int
    sparse: bool
    columns: int
    rows: int
    holder_rows: int
    cold_offset: int
    all_ids: bool
    weight: torch.nn.Parameter
    pointer_table: Tensor
    holder_ids: Tensor | None
    h0: UniversalHash
    h1: UniversalHash
    cold1: UniversalHash | None

    if TYPE_CHECKING:  # the host's (a definition here would shadow it at run time)

        @property
        def rounds(self) -> int: ...

    def _mode(self) -> int:
        """0: every pointer hashed (not clustered yet); 1: every id's pointers stored; 2: the sketch's top ids'."""
        return 0 if self.rounds == 0 else (1 if self.all_ids else 2)

    def _routing(self) -> Routing:
        """The compiled kernels' routing arguments (CPU numpy): mode, pointers, holders, hashes, k, the regions."""
        cold1 = self.h1 if self.cold1 is None else self.cold1
        return (
            self._mode(),
            self.pointer_table.numpy(),
            NO_HOLDERS if self.holder_ids is None else self.holder_ids.numpy(),
            self.h0.coefficients.numpy(),
            self.h1.coefficients.numpy(),
            cold1.coefficients.numpy(),
            self.rows,
            self.cold_offset,
            self.rows - self.cold_offset,
            self.holder_rows,
        )

    def _route(self, ids: Tensor) -> Tensor:
        """Rows ``(N, c, 2)`` of ``weight`` each id reads: T0's and T1's, per column."""
        if on_host(ids, self.pointer_table):  # one compiled pass (the torch ops below give the same)
            out = torch.empty(ids.numel(), self.columns, 2, dtype=torch.int64)
            route_rows(ids.numpy(), *self._routing(), out.numpy())
            return out
        return self._route_torch(ids, self._mode())

    def _route_torch(self, ids: Tensor, mode: int) -> Tensor:
        """:meth:`_route` in torch ops, for any device."""
        c, k = self.columns, self.rows
        first = self.h0(ids) + self.cold_offset
        second = (self.h1 if self.cold1 is None else self.cold1)(ids) + self.cold_offset
        if mode == 1:
            first, second = self.pointer_table[ids].long(), self.h1(ids)
        elif mode == 2:
            holders = self.holder_ids
            assert holders is not None  # mode 2: the top ids hold the pointers
            position = torch.searchsorted(holders, ids.contiguous()).clamp_max_(holders.numel() - 1)
            found = (holders[position] == ids).unsqueeze(-1)
            first = torch.where(found, self.pointer_table[position].long(), first)
            second = torch.where(found, self.h1(ids), second)
        offsets = torch.arange(c, device=ids.device) * k
        return torch.stack([first + offsets, second + offsets + c * k], dim=-1)

    def _vectors(self, ids: Tensor) -> Tensor:
        # the compiled kernel reads float32/float64 tables (numba has no float16 or bfloat16): others take torch ops
        if on_host(ids, self.weight, self.pointer_table) and self.weight.dtype in (torch.float32, torch.float64):
            return PairGather.apply(self.weight, ids, self._routing(), self.sparse)
        # elsewhere each (id, column) is a bag of two rows, T0's and T1's: one fused gather
        rows = self._route(ids).to(self.weight.device)
        out = F.embedding_bag(rows.view(-1, 2), self.weight, mode="sum", sparse=self.sparse)
        return out.view(ids.numel(), self.embedding_dim)
