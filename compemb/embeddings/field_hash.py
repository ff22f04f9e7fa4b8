"""Per-field hashing with small fields full: the hash baseline of the CAFE paper (Zhang et al., SIGMOD 2024,
arXiv 2312.03256), as its authors' code builds it (HugoZHL/CAFE ``embeddings/init_embed.py``).

In a shared collection (``blocks``: the features' sizes) each field hashes its ids into a table of its own, its rows
in proportion to its ids, and small fields keep a row per id (:mod:`compemb.embeddings.fields`): the baseline the
paper's "+3.92% AUC at 10,000x" is measured against. compemb's ``hash`` (one table for every field's ids) is a
stronger baseline at high ratios: the rows go where the traffic is. Without ``blocks`` this is ``hash``. Deviations:
the hashed row is a seeded universal hash of the id (the authors: ``id mod rows``); every table starts at the
shared full table's scale (the authors: per field, ``sqrt(1/n_f)``); the field tables count in the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, every_budget_from, resolve_budget, rows_for
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.embeddings.fields import plan_fields, split_rows
from compemb.hashing import UniversalHash, coefficient_bytes, hash_high32
from compemb.registry import register


@register("hash-fields")
class FieldHashEmbedding(CompressedEmbedding):
    """A hashed table per field, small fields full (CAFE's baseline); one field (plain hashing) without ``blocks``.

    Args:
        blocks: the fields' sizes in id order (a shared ``EmbeddingCollection`` passes its features'), summing to
            ``num_embeddings``.

    Example::

        >>> emb = FieldHashEmbedding(10_010, 16, compression=100, blocks=[10, 10_000])
        >>> emb.field_full.tolist(), emb.field_rows.tolist()  # 10 ids x 100 <= 2,000: kept full
        ([True, False], [10, 89])
    """

    title = "hash per field, small ones full"
    formula = "sum_f rows_f * d"
    takes_feature_blocks = True
    num_embeddings: int  # a closed vocabulary: the base class refuses None
    field_full: Tensor
    field_rows: Tensor
    field_offsets: Tensor
    field_starts: Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        blocks: Sequence[int] | None = None,
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
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        n, d = self.num_embeddings, self.embedding_dim
        sizes = [n] if blocks is None else [int(b) for b in blocks]
        if min(sizes) < 1 or sum(sizes) != n:
            raise ValueError(
                f"{self._who()}: blocks must be positive field sizes summing to num_embeddings={n}, got "
                f"{list(blocks or [])!r}"
            )
        ratio = n * d * FLOAT_BYTES / budget.num_bytes
        full = plan_fields(sizes, d, ratio, budget.num_bytes) if len(sizes) > 1 else [False]
        compressed = [size for size, kept in zip(sizes, full) if not kept]
        # the field tables (rows, offsets, starts: int64; full: bool) and the hash count in the budget
        fixed = coefficient_bytes(1) + len(sizes) * (3 * 8 + 1) + 8
        full_ids = sum(size for size, kept in zip(sizes, full) if kept)
        hashed = max(len(compressed), rows_for(budget, d, fixed + full_ids * d * FLOAT_BYTES))
        shares = iter(split_rows(hashed, compressed))
        rows = [size if kept else next(shares) for size, kept in zip(sizes, full)]
        self.hash = UniversalHash(max(rows), seed=seed, device=device)
        # derived from the sizes alone; kept on the CPU too, to be written again by reset (after a meta build)
        self._layout = {
            "field_full": torch.tensor(full),
            "field_rows": torch.tensor(rows, dtype=torch.int64),
            "field_offsets": torch.tensor([0, *np.cumsum(rows)[:-1].tolist()], dtype=torch.int64),
            "field_starts": torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64),
        }
        for key, value in self._layout.items():
            self.register_buffer(key, value.to(device, copy=True))
        self.weight = torch.nn.Parameter(torch.empty(sum(rows), d, device=device))
        smallest = fixed + (full_ids + len(compressed)) * d * FLOAT_BYTES
        self._finish(budget, seed, -(-smallest // FLOAT_BYTES), every_budget_from(d, smallest))

    def reset_tables(self) -> None:
        for key, value in self._layout.items():
            getattr(self, key).copy_(value)
        init_uniform_(self.weight, self.init_bound, self._generator())

    def rows_of(self, ids: Tensor) -> Tensor:
        """The row of ``weight`` each id reads: its own in a full field, else its field's hashed row."""
        field = torch.searchsorted(self.field_starts, ids.contiguous(), right=True) - 1
        bucket = hash_high32(ids, self.hash.coefficients).squeeze(-1).mul_(self.field_rows[field])
        bucket = bucket.bitwise_right_shift_(32)
        own = ids - self.field_starts[field]
        return self.field_offsets[field] + torch.where(self.field_full[field], own, bucket)

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(self.rows_of(ids), self.weight, sparse=self.sparse)

    def describe_sizes(self) -> str:
        """How many fields stay full and the hashed rows of the others, in a line (for ``compemb methods``)."""
        full_fields, rows = self._layout["field_full"], self._layout["field_rows"]  # CPU copies (meta builds too)
        full, hashed = int(full_fields.sum()), int(rows[~full_fields].sum())
        return f"{full} of {len(self.field_full)} fields full; {hashed:,} hashed rows for the others"

    def extra_repr(self) -> str:
        full_fields = self._layout["field_full"]
        return super().extra_repr() + f", fields={len(full_fields)}, full_fields={int(full_fields.sum())}"
