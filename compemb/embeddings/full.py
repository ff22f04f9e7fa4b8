"""The full table: one trainable row per id, the baseline every method is measured against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, Budget, full_table_bytes, resolve_budget
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.registry import register
from compemb.table_batch import PackedWeights, check_id_ranges


@register("full")
class FullEmbedding(CompressedEmbedding):
    """The uncompressed ``num_embeddings x embedding_dim`` table (nn.EmbeddingBag with the common interface).

    Its budget is its own size: give no budget, ``compression=1`` or ``num_params=n*d``.

    Example::

        >>> emb = FullEmbedding(1000, 16, sparse=True)
        >>> emb(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 2, 16])
    """

    compresses = False
    title = "full table (baseline)"
    formula = "n * d"

    def __init__(
        self,
        num_embeddings: int,
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
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
        )
        if compression is None and num_params is None:
            budget = Budget(full_table_bytes(num_embeddings, embedding_dim))
        else:
            budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        full_params = num_embeddings * embedding_dim
        if abs(budget.num_bytes - full_params * FLOAT_BYTES) > 0.01 * budget.num_bytes:
            # checked before allocating: a full table can be large
            raise ValueError(
                f"full stores exactly n*d = {full_params:,} params; it cannot meet a budget of "
                f"{budget.num_params:,.0f} params: the smallest budget it can meet is {full_params:,} params"
            )
        self.weight = torch.nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device))
        self._finish(budget, seed, full_params, largest_params=full_params)

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Tensor,
        freeze: bool = True,
        padding_idx: int | None = None,
        mode: str = "sum",
        sparse: bool = False,
        include_last_offset: bool = False,
        name: str | None = None,
    ) -> FullEmbedding:
        """A table holding ``embeddings`` ``(n, d)`` (copied; its dtype and device), as nn.Embedding.from_pretrained:
        ``freeze`` (default) makes it untrainable. To compress a trained table, see :func:`compemb.compress`.

        Example::

            >>> table = FullEmbedding.from_pretrained(torch.eye(3), padding_idx=0)
            >>> table(torch.tensor([0, 2])).tolist(), table.weight.requires_grad
            ([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], False)
        """
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
            raise ValueError("embeddings must be a 2-D floating-point tensor (num_embeddings, embedding_dim)")
        table = cls(
            embeddings.shape[0],
            embeddings.shape[1],
            mode=mode,
            sparse=sparse,
            name=name,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device="meta",
        )
        table.weight = torch.nn.Parameter(embeddings.detach().clone(), requires_grad=not freeze)
        return table

    def reset_tables(self) -> None:
        init_uniform_(self.weight, self.init_bound, self._generator())
        if self.padding_idx is not None and not self.weight.is_meta:  # as nn.Embedding: the padding row is zeros
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, sparse=self.sparse)

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> _FullTablesBatch:
        """Full tables side by side: id x of table j reads row ``start_j + x`` of their packed weights."""
        return _FullTablesBatch(tables)

    def lookup_bags(
        self, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, one_id_per_bag: bool = False
    ) -> Tensor:
        return F.embedding_bag(
            ids, self.weight, offsets, mode=self.mode, per_sample_weights=per_sample_weights, sparse=self.sparse
        )


class _FullTablesBatch:
    """One gather for one id per full table (see :mod:`compemb.table_batch`)."""

    def __init__(self, tables: Sequence[CompressedEmbedding]) -> None:
        self.tables = list(tables)
        self.pack = PackedWeights(self.tables, "weight", sparse=tables[0].sparse)
        self.sizes = torch.tensor([t.num_embeddings for t in tables], device=self.pack.row_offsets.device)

    def __call__(self, ids: Tensor) -> Tensor:
        if self.sizes.device != ids.device:
            self.sizes = self.sizes.to(ids.device)
        check_id_ranges(self.tables, ids, self.sizes)
        rows = self.pack.gather((ids + self.pack.row_offsets).unsqueeze(-1))
        return rows.squeeze(-2)
