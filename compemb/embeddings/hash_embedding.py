"""Hash Embeddings.

"Hash Embeddings for Efficient Word Representations", Svenstrup, Hansen & Winther, NeurIPS 2017
(arXiv 1709.03933). Id x reads k component vectors ``E[h_1(x)] .. E[h_k(x)]`` from a shared pool of B rows and
combines them with its own importance weights ``p_x = P[h_w(x)]`` (k values, themselves looked up by hashing
into K rows): ``e_x = sum_i p_x[i] * E[h_i(x)]``.

Deviations: the output is ``e_x`` alone (the paper may also append ``p_x``); the budget is split between the pool
and the importance table by ``importance_share`` (default 0.5, the paper's K*k = B*d); importance weights start
U(-sqrt(3/k), sqrt(3/k)) so the output starts with the spread of every other method's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, Budget, every_budget_from, resolve_budget, rows_for
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.hashing import UniversalHash, coefficient_bytes
from compemb.registry import register
from compemb.table_batch import IdRanges, PackedWeights, column_sizes, hash_columns


@register("hemb")
class HashEmbeddings(CompressedEmbedding):
    """Hash Embeddings: k hashed components from a shared pool, mixed by per-id hashed importance weights.

    Args:
        num_hashes: k, components per id (default 2, as in the paper).
        importance_share: the part of the budget spent on importance weights (default 0.5).

    Example::

        >>> emb = HashEmbeddings(None, 16, num_params=20_000, num_hashes=2)
        >>> emb.pool.shape, emb.importance.shape
        (torch.Size([625, 16]), torch.Size([4994, 2]))
    """

    open_vocabulary = True
    title = "Hash Embeddings"
    formula = "B * d + K * k"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        num_hashes: int = 2,
        importance_share: float = 0.5,
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
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
        )
        if num_hashes < 1:
            raise ValueError(f"hemb: num_hashes must be >= 1, got {num_hashes}")
        if not 0 < importance_share < 1:
            raise ValueError(f"hemb: importance_share must be in (0, 1), got {importance_share}")
        self.num_hashes = num_hashes
        self.importance_share = importance_share
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        hash_bytes = coefficient_bytes(num_hashes + 1)
        float_bytes = budget.num_bytes - hash_bytes
        pool_rows = rows_for(Budget(round(float_bytes * (1 - importance_share))), embedding_dim)
        importance_rows = rows_for(Budget(float_bytes - pool_rows * embedding_dim * FLOAT_BYTES), num_hashes)
        self.component_hash = UniversalHash(pool_rows, num_functions=num_hashes, seed=seed, stream=0, device=device)
        self.importance_hash = UniversalHash(importance_rows, num_functions=1, seed=seed, stream=1, device=device)
        self.pool = torch.nn.Parameter(torch.empty(pool_rows, embedding_dim, device=device))
        self.importance = torch.nn.Parameter(torch.empty(importance_rows, num_hashes, device=device))
        # the importance table absorbs the pool's rounding, so sizes move in steps of k floats
        smallest = embedding_dim + num_hashes + hash_bytes // FLOAT_BYTES
        self._finish(budget, seed, smallest, every_budget_from(num_hashes, hash_bytes, embedding_dim + num_hashes))

    def reset_tables(self) -> None:
        init_uniform_(self.pool, self.init_bound, self._generator(0))
        init_uniform_(self.importance, math.sqrt(3 / self.num_hashes), self._generator(1))

    def lookup(self, ids: Tensor) -> Tensor:
        weights = F.embedding(self.importance_hash(ids).squeeze(-1), self.importance, sparse=self.sparse)
        # one fused kernel: each id is a bag of its k components, weighted by its importance weights
        return F.embedding_bag(
            self.component_hash(ids), self.pool, mode="sum", per_sample_weights=weights, sparse=self.sparse
        )

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> _HashEmbeddingsBatch | None:
        """Tables of one ``num_hashes``: one gather of every importance weight and one of every component."""
        same = cast("Sequence[HashEmbeddings]", tables)  # tables of this class (CompressedEmbedding.table_batch)
        if len({t.num_hashes for t in same}) != 1:
            return None
        return _HashEmbeddingsBatch(same)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_hashes={self.num_hashes}"


class _HashEmbeddingsBatch:
    """Hash embeddings of many features: vectorised hashes, two gathers (see :mod:`compemb.table_batch`)."""

    def __init__(self, tables: Sequence[HashEmbeddings]) -> None:
        self.tables = list(tables)
        self.pools = PackedWeights(self.tables, "pool", sparse=tables[0].sparse)
        self.importances = PackedWeights(self.tables, "importance", sparse=tables[0].sparse)
        device = self.pools.row_offsets.device
        self.pool_rows = column_sizes([t.pool.shape[0] for t in tables], device)
        self.importance_rows = column_sizes([t.importance.shape[0] for t in tables], device)
        self.ranges = IdRanges(self.tables)

    def __call__(self, ids: Tensor) -> Tensor:
        self.ranges.check(ids)
        if self.pool_rows.device != ids.device:
            self.pool_rows, self.importance_rows = self.pool_rows.to(ids.device), self.importance_rows.to(ids.device)
        components = hash_columns(ids, [t.component_hash for t in self.tables], self.pool_rows)
        places = hash_columns(ids, [t.importance_hash for t in self.tables], self.importance_rows)
        weights = self.importances.gather(places.add_(self.importances.row_offsets.view(-1, 1))).squeeze(-2)
        vectors = self.pools.gather(components.add_(self.pools.row_offsets.view(-1, 1)))  # (batch, tables, k, d)
        return (vectors * weights.unsqueeze(-1)).sum(-2)
