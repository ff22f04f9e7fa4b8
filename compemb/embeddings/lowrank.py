"""Low-rank tables: each id stores r coordinates, projected to d by one shared r x d matrix.

The factorised baseline of the CCE paper's repository ("a low-dimensional table"): ``E = A P`` with ``A`` an
``n x r`` table and ``P`` an ``r x d`` projection, both trained. Deviation, so that every budget from one coordinate
per id up is met within 1% (a whole rank moves the size in steps of n floats): the rank may be fractional, ``r =
r_lo + m / n``. The first ``m`` ids store ``r_lo + 1`` coordinates and the rest ``r_lo`` (their last coordinate is
zero), which is a rank-``r_lo + 1`` factorisation with ``n - m`` entries fixed at zero. Which ids get the extra
coordinate is by id (the smallest ``m``); no frequencies are needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, resolve_budget
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.registry import register


@register("lowrank")
class LowRankEmbedding(CompressedEmbedding):
    """``E = A P``: ``A`` holds ``r`` coordinates per id, ``P`` (``r x d``) projects them; ``r`` from the budget.

    Sizes: ``n * r_lo + m + (r_lo + 1) * d`` floats for a fractional rank ``r = r_lo + m / n`` (see the module
    docstring); a budget under one coordinate per id (``n + d`` floats) or over the full table's size is refused.
    Init: ``A`` ~ U(-b, b) and ``P`` ~ U(+-sqrt(3 / r)) (variance 1/r), so an untrained vector's coordinates have
    the full table's variance ``b^2 / 3``.

    Example::

        >>> emb = LowRankEmbedding(10_000, 16, compression=10)
        >>> emb.rank, emb.extended_ids, emb.memory().total  # 5,968 ids store 2 coordinates, the rest 1
        (1.5968, 5968, 64000)
    """

    title = "low rank: n x r times r x d"
    formula = "n * r + r * d"
    per_id_bytes = FLOAT_BYTES  # one coordinate per id at least
    num_embeddings: int  # a closed vocabulary: the base class refuses None

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
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        n, d, floats = self.num_embeddings, self.embedding_dim, budget.num_bytes / FLOAT_BYTES
        largest = n * d  # beyond the full table's size the full table is the better choice
        # out of range, the nearest size is built and _finish's check names the range it can meet
        floats = min(max(floats, n + d), largest)
        low = max(1, min(d - 1, math.floor((floats - d) / n)))
        extended = int(max(0, min(n, round(floats - n * low - (low + 1) * d))))
        if extended == n:  # every id stores low + 1: a whole rank
            low, extended = low + 1, 0
        self.low_rank, self.extended_ids = low, extended
        self.rank = round(low + extended / n, 6)
        full_rank = low + (1 if extended else 0)
        self.low = torch.nn.Parameter(torch.empty(n, low, device=device))
        self.extra = torch.nn.Parameter(torch.empty(extended, 1, device=device)) if extended else None
        self.projection = torch.nn.Parameter(torch.empty(full_rank, d, device=device))
        self._finish(budget, seed, n + d, n + 2 * d, largest)

    def reset_tables(self) -> None:
        bound = self.init_bound
        init_uniform_(self.low, bound, self._generator())
        if self.extra is not None:
            init_uniform_(self.extra, bound, self._generator(1))
        init_uniform_(self.projection, math.sqrt(3 / self.projection.shape[0]), self._generator(2))

    def lookup(self, ids: Tensor) -> Tensor:
        coordinates = F.embedding(ids, self.low, sparse=self.sparse)
        if self.extra is not None:  # the first extended_ids ids store one more coordinate; the others read zero
            inside = (ids < self.extended_ids).unsqueeze(-1)
            extra = F.embedding(ids.clamp(max=self.extended_ids - 1), self.extra, sparse=self.sparse)
            coordinates = torch.cat([coordinates, extra * inside], dim=-1)
        return coordinates @ self.projection

    def describe_sizes(self) -> str:
        """The rank the budget chose, in a line (for ``compemb methods``)."""
        projection = f"projection {self.projection.shape[0]} x {self.embedding_dim}"
        if not self.extended_ids:  # a whole rank: every id stores as many coordinates
            return f"rank {self.rank:g}: every id stores {self.low_rank} coordinate{'s' * (self.low_rank > 1)}; {projection}"
        return (
            f"rank {self.rank:g}: {self.extended_ids:,} ids store {self.low_rank + 1} coordinates, "
            f"the others {self.low_rank}; {projection}"
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank:g}"
