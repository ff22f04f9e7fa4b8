"""Hash-family baselines: the hashing trick, compositional (CE) and Bloom embeddings.

- ``hash``: "Feature Hashing for Large Scale Multitask Learning", Weinberger et al. 2009 (arXiv 0902.2206):
  id -> one row of a shared table. No sign hash (the row is trained, so a sign adds nothing).
- ``ce``: the compositional baseline of "Clustering the Sketch" (Tsang & Ahle 2023, arXiv 2210.05974), after
  Shi et al. 2020 (arXiv 1909.02107): ``c`` columns of ``d/c`` dims, column j read from its own hashed table.
- ``bloom``: "Getting Deep Recommenders Fit: Bloom Embeddings", Serra & Karatzoglou 2017 (arXiv 1706.03993):
  the mean of ``c`` hashed rows of one table (the paper hashes the input/output layers; here the table).

All three accept any int64 id (an open vocabulary) and hash all functions in one vectorised pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, every_budget_from, resolve_budget, rows_for
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.hashing import UniversalHash, coefficient_bytes
from compemb.registry import register
from compemb.table_batch import IdRanges, PackedWeights, column_sizes, hash_columns


class _HashedTable(CompressedEmbedding):
    """``tables`` stacked tables of ``rows x row_dim`` floats, addressed by ``num_hashes`` seeded hashes of the id."""

    open_vocabulary = True

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        row_dim: int,
        tables: int,
        num_hashes: int,
        compression: float | None,
        num_params: int | None,
        seed: int,
        mode: str,
        sparse: bool,
        name: str | None,
        init: str,
        include_last_offset: bool,
        padding_idx: int | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
        )
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        # tables * row_dim == embedding_dim, so the budget buys `rows` rows in every table
        hash_bytes = coefficient_bytes(num_hashes)
        self.rows = rows_for(budget, embedding_dim, reserved_bytes=hash_bytes)
        self.hash = UniversalHash(self.rows, num_functions=num_hashes, seed=seed, device=device)
        self.weight = torch.nn.Parameter(torch.empty(self.rows * tables, row_dim, device=device))
        one_row = embedding_dim + hash_bytes // FLOAT_BYTES
        self._finish(budget, seed, one_row, every_budget_from(embedding_dim, hash_bytes))

    def reset_tables(self) -> None:
        init_uniform_(self.weight, self.init_bound, self._generator())

    @staticmethod
    def _combine_rows(rows: Tensor) -> Tensor:
        """An id's vector from its gathered rows ``(..., num_hashes, row_dim)`` (a table batch's last step)."""
        raise NotImplementedError

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> _HashedTablesBatch | None:
        """Tables of one hash count: every feature's hashes in one pass, one gather over their packed weights."""
        hashed = cast("Sequence[_HashedTable]", tables)  # tables of this class (CompressedEmbedding.table_batch)
        if len({t.hash.num_functions for t in hashed}) != 1:
            return None
        return _HashedTablesBatch(hashed, cls._combine_rows, stacked_columns=cls is CompositionalEmbedding)


class _HashedTablesBatch:
    """One vectorised hash of every feature's ids and one gather (see :mod:`compemb.table_batch`).

    Table j's hash i of id x is exactly its own lookup's (:func:`~compemb.table_batch.hash_columns`); a
    compositional table's column i lies ``i * rows_j`` rows into its weight (``stacked_columns``).
    """

    def __init__(
        self, tables: Sequence[_HashedTable], combine: Callable[[Tensor], Tensor], stacked_columns: bool
    ) -> None:
        self.tables = list(tables)
        self.combine = combine
        self.pack = PackedWeights(self.tables, "weight", sparse=tables[0].sparse)
        device = self.pack.row_offsets.device
        num_hashes = tables[0].hash.num_functions
        self.rows = column_sizes([t.rows for t in tables], device)
        column_starts = torch.arange(num_hashes, device=device) * self.rows if stacked_columns else 0
        self.starts = self.pack.row_offsets.view(-1, 1) + column_starts  # (tables, num_hashes)
        self.ranges = IdRanges(self.tables)

    def __call__(self, ids: Tensor) -> Tensor:
        self.ranges.check(ids)
        if self.rows.device != ids.device:
            self.rows, self.starts = self.rows.to(ids.device), self.starts.to(ids.device)
        buckets = hash_columns(ids, [t.hash for t in self.tables], self.rows).add_(self.starts)
        return self.combine(self.pack.gather(buckets))


@register("hash")
class HashingTrickEmbedding(_HashedTable):
    """The hashing trick: id x reads row ``h(x)`` of a ``rows x d`` table.

    Example::

        >>> emb = HashingTrickEmbedding(None, 16, num_params=16_000, sparse=True)
        >>> emb(torch.tensor([-3, 2**40])).shape
        torch.Size([2, 16])
    """

    title = "hashing trick"
    formula = "rows * d"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            row_dim=embedding_dim,
            tables=1,
            num_hashes=1,
            compression=compression,
            num_params=num_params,
            seed=seed,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device=device,
        )

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(self.hash(ids).squeeze(-1), self.weight, sparse=self.sparse)

    @staticmethod
    def _combine_rows(rows: Tensor) -> Tensor:
        return rows.squeeze(-2)

    @classmethod
    def table_batch_with_full(cls, tables: Sequence[CompressedEmbedding]) -> _HashedAndFullBatch | None:
        """Hashed tables and the full tables beside them (a per-feature collection keeps its small features full)
        as one batch: one gather and, their weights in one buffer, one optimizer update for all (None where a
        vocabulary is open or the rows differ in width)."""
        if any(t.num_embeddings is None for t in tables) or len({t.embedding_dim for t in tables}) != 1:
            return None
        return _HashedAndFullBatch(tables)

    def lookup_bags(
        self, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, one_id_per_bag: bool = False
    ) -> Tensor:
        return F.embedding_bag(
            self.hash(ids).squeeze(-1),
            self.weight,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            sparse=self.sparse,
        )


class _HashedAndFullBatch:
    """Hashing-trick and full tables packed together: column j reads row ``h_j(x)`` of a hashed table, row ``x``
    of a full one, every column's row found in one pass and read with one gather, exactly each table's own lookup.
    """

    def __init__(self, tables: Sequence[CompressedEmbedding]) -> None:
        self.tables = list(tables)
        self.pack = PackedWeights(self.tables, "weight", sparse=tables[0].sparse)
        device = self.pack.row_offsets.device
        hashed = [j for j, t in enumerate(self.tables) if isinstance(t, HashingTrickEmbedding)]
        self.hashed = torch.tensor(hashed, dtype=torch.int64, device=device)
        hashed_tables = [t for t in self.tables if isinstance(t, HashingTrickEmbedding)]  # the tables at `hashed`
        self.hashes = [t.hash for t in hashed_tables]
        self.rows = column_sizes([t.rows for t in hashed_tables], device)
        self.ranges = IdRanges(self.tables)

    def __call__(self, ids: Tensor) -> Tensor:
        self.ranges.check(ids)
        if self.rows.device != ids.device:
            self.rows, self.hashed = self.rows.to(ids.device), self.hashed.to(ids.device)
        buckets = hash_columns(ids.index_select(1, self.hashed), self.hashes, self.rows).squeeze(-1)
        rows = ids.index_copy(1, self.hashed, buckets).add_(self.pack.row_offsets)
        return self.pack.gather(rows.unsqueeze(-1)).squeeze(-2)


@register("ce")
class CompositionalEmbedding(_HashedTable):
    """Compositional embedding: ``c`` concatenated columns, column j = row ``h_j(x)`` of table j (``rows x d/c``).

    Args:
        columns: c, which must divide the embedding dim (default 4, as in the CCE paper).

    Example::

        >>> emb = CompositionalEmbedding(10_000, 16, compression=10, columns=4)
        >>> emb.weight.shape  # 4 tables of 999 rows x 4 dims, stored as one (the rest holds the hashes)
        torch.Size([3996, 4])
    """

    title = "compositional, c hashed columns"
    formula = "c * rows * (d / c)"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        columns: int = 4,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if columns < 1 or embedding_dim % columns:
            raise ValueError(f"ce: columns={columns} must be >= 1 and divide embedding_dim={embedding_dim}")
        self.columns = columns
        super().__init__(
            num_embeddings,
            embedding_dim,
            row_dim=embedding_dim // columns,
            tables=columns,
            num_hashes=columns,
            compression=compression,
            num_params=num_params,
            seed=seed,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device=device,
        )

    def lookup(self, ids: Tensor) -> Tensor:
        # column j's table occupies rows [j * rows, (j + 1) * rows) of the stored weight
        offsets = torch.arange(self.columns, device=ids.device) * self.rows
        rows = self.hash(ids) + offsets
        return F.embedding(rows, self.weight, sparse=self.sparse).reshape(ids.numel(), self.embedding_dim)

    @staticmethod
    def _combine_rows(rows: Tensor) -> Tensor:  # the columns side by side
        return rows.flatten(-2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", columns={self.columns}"


@register("bloom")
class BloomEmbedding(_HashedTable):
    """Bloom embedding: the mean of rows ``h_1(x) .. h_c(x)`` of one ``rows x d`` table.

    Args:
        num_hashes: c, how many rows each id averages (default 2).

    Example::

        >>> emb = BloomEmbedding(None, 8, num_params=8_000, num_hashes=3)
        >>> emb(torch.tensor([5])).shape
        torch.Size([1, 8])
    """

    title = "Bloom: mean of c hashed rows"
    formula = "rows * d"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        num_hashes: int = 2,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if num_hashes < 1:
            raise ValueError(f"bloom: num_hashes must be >= 1, got {num_hashes}")
        self.num_hashes = num_hashes
        super().__init__(
            num_embeddings,
            embedding_dim,
            row_dim=embedding_dim,
            tables=1,
            num_hashes=num_hashes,
            compression=compression,
            num_params=num_params,
            seed=seed,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device=device,
        )

    def reset_tables(self) -> None:
        # the mean of c rows shrinks the spread by sqrt(c); widen the rows to keep the output's
        init_uniform_(self.weight, self.init_bound * self.num_hashes**0.5, self._generator())

    def lookup(self, ids: Tensor) -> Tensor:
        # the mean as a sum times 1/c: the same values, and the sum's backward is the faster kernel
        return F.embedding_bag(self.hash(ids), self.weight, mode="sum", sparse=self.sparse) * (1 / self.num_hashes)

    @staticmethod
    def _combine_rows(rows: Tensor) -> Tensor:
        return rows.sum(-2) * (1 / rows.shape[-2])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_hashes={self.num_hashes}"
