"""Flat-array methods: every float of every vector is read from one shared 1-D array of the budget's size.

- ``robe``: ROBE-Z, "Random Offset Block Embedding (ROBE) for compressed embedding tables in deep learning
  recommendation systems", Desai, Chou & Shrivastava, MLSys 2022 (arXiv 2108.02191). The vector is c chunks
  of Z = d/c values; chunk j of id x reads Z contiguous values of a circular array from a hashed offset
  ``h(x, j)``, times a hashed sign ``g(x, j)``.
- ``hashednets``: "Compressing Neural Networks with the Hashing Trick", Chen et al., ICML 2015 (arXiv 1504.04788),
  applied to the embedding table: coordinate j of id x is ``g(x, j) * w[h(x, j)]``.

The array is stored as an ``(size, 1)`` parameter so that lookups are ordinary (sparse-capable) embedding reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from compemb.budget import FLOAT_BYTES, every_budget_from, resolve_budget
from compemb.embeddings.base import CompressedEmbedding, gather_scalars, init_uniform_
from compemb.hashing import UniversalHash, coefficient_bytes
from compemb.registry import register
from compemb.table_batch import IdRanges, PackedWeights, column_sizes, hash_columns, sign_columns


class _FlatArray(CompressedEmbedding):
    """One flat array filling the budget, read at ``num_hashes`` hashed places per id, with optional signs."""

    open_vocabulary = True

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        num_hashes: int,
        min_size: int,
        signed: bool,
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
        hash_bytes = coefficient_bytes(num_hashes * (2 if signed else 1))
        self.size = max(min_size, round((budget.num_bytes - hash_bytes) / FLOAT_BYTES))
        self.signed = signed
        self.hash = UniversalHash(self.size, num_functions=num_hashes, seed=seed, stream=0, device=device)
        # signs come from functions of their own (their bucket count is unused)
        self.sign_hash = UniversalHash(2, num_hashes, seed=seed, stream=1, device=device) if signed else None
        self.weight = torch.nn.Parameter(torch.empty(self.size, 1, device=device))
        self._finish(budget, seed, min_size + hash_bytes // FLOAT_BYTES, every_budget_from(1, hash_bytes, min_size))

    def reset_tables(self) -> None:
        init_uniform_(self.weight, self.init_bound, self._generator())

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> _FlatArraysBatch | None:
        """Flat arrays of one layout (chunks, signs): every feature's places hashed at once, one gather."""
        arrays = cast("Sequence[_FlatArray]", tables)  # tables of this class (CompressedEmbedding.table_batch)
        if len({(t.hash.num_functions, t.signed, getattr(t, "chunk_size", 1)) for t in arrays}) != 1:
            return None
        return _FlatArraysBatch(arrays)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", size={self.size}" + ("" if self.signed else ", signed=False")


class _FlatArraysBatch:
    """ROBE or HashedNets arrays of many features (see :mod:`compemb.table_batch`): ROBE reads ``chunk_size``
    consecutive values (circularly) from each hashed start, HashedNets one value per hash (``chunk_size`` 1)."""

    def __init__(self, tables: Sequence[_FlatArray]) -> None:
        self.tables = list(tables)
        self.pack = PackedWeights(self.tables, "weight", sparse=tables[0].sparse)
        self.chunk_size = getattr(tables[0], "chunk_size", 1)
        self.signed = tables[0].signed
        self.sizes = column_sizes([t.size for t in tables], self.pack.row_offsets.device)
        self.ranges = IdRanges(self.tables)

    def __call__(self, ids: Tensor) -> Tensor:
        self.ranges.check(ids)
        if self.sizes.device != ids.device:
            self.sizes = self.sizes.to(ids.device)
        batch, count = ids.shape
        starts = hash_columns(ids, [t.hash for t in self.tables], self.sizes)  # (batch, tables, c)
        if self.chunk_size > 1:  # each start reads chunk_size consecutive places, wrapping past the end
            places = starts.unsqueeze(-1) + torch.arange(self.chunk_size, device=ids.device)
            sizes = self.sizes.view(-1, 1, 1)
            starts = torch.where(places >= sizes, places - sizes, places).view(batch, count, -1)
        values = self.pack.gather(starts.add_(self.pack.row_offsets.view(-1, 1))).squeeze(-1)  # (batch, tables, d)
        if self.signed:
            sign_hashes = cast("list[UniversalHash]", [t.sign_hash for t in self.tables])  # signed: none is None
            signs = sign_columns(ids, sign_hashes, values.dtype)  # (batch, tables, c)
            values = (values.view(batch, count, signs.shape[-1], -1) * signs.unsqueeze(-1)).view(batch, count, -1)
        return values


@register("robe")
class ROBEEmbedding(_FlatArray):
    """ROBE-Z: c chunks of Z = d/c contiguous values from hashed offsets into one circular array.

    Args:
        chunks: c, which must divide the embedding dim (default 2, so Z = d/2).
        signed: multiply each chunk by a hashed sign (default True, as the paper).

    Example::

        >>> emb = ROBEEmbedding(None, 16, num_params=10_000, chunks=2)
        >>> emb(torch.tensor([1, 2, 3])).shape
        torch.Size([3, 16])
    """

    title = "ROBE-Z: circular array"
    formula = "size"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        chunks: int = 2,
        signed: bool = True,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if chunks < 1 or embedding_dim % chunks:
            raise ValueError(f"robe: chunks={chunks} must be >= 1 and divide embedding_dim={embedding_dim}")
        self.chunks = chunks
        self.chunk_size = embedding_dim // chunks
        super().__init__(
            num_embeddings,
            embedding_dim,
            num_hashes=chunks,
            min_size=self.chunk_size,
            signed=signed,
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
        starts = self.hash(ids)  # (N, c) in [0, size)
        places = starts.unsqueeze(-1) + torch.arange(self.chunk_size, device=ids.device)
        places = torch.where(places >= self.size, places - self.size, places)  # circular: wrap past the end
        values = gather_scalars(self.weight, places, self.sparse)  # (N, c, Z)
        if self.sign_hash is not None:
            values = values * self.sign_hash.signs(ids, values.dtype).unsqueeze(-1)
        return values.reshape(ids.numel(), self.embedding_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunks={self.chunks}"


@register("hashednets")
class HashedNetsEmbedding(_FlatArray):
    """HashedNets: each coordinate (x, j) reads ``sign(x, j) * w[h(x, j)]`` from one flat array.

    Args:
        signed: multiply by the hashed sign (default True, as the paper).

    Example::

        >>> emb = HashedNetsEmbedding(1000, 8, compression=10)
        >>> emb.weight.shape
        torch.Size([736, 1])
    """

    title = "HashedNets: hashed coordinates"
    formula = "size"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        signed: bool = True,
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
            num_hashes=embedding_dim,
            min_size=1,
            signed=signed,
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
        values = gather_scalars(self.weight, self.hash(ids), self.sparse)  # (N, d)
        return values if self.sign_hash is None else values * self.sign_hash.signs(ids, values.dtype)
