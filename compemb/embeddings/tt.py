"""TT-Rec: "TT-Rec: Tensor Train Compression for Deep Learning Recommendation Model Embeddings", Yin et al.,
MLSys 2021 (arXiv 2101.11714).

The ``n x d`` table is a tensor train of three cores. The vocabulary is factorised as ``n <= n1 * n2 * n3`` and the
dim as ``d = d1 * d2 * d3``; id ``x`` has digits ``(x1, x2, x3)`` (``x = (x1 * n2 + x2) * n3 + x3``) and its vector is
the product ``G1[x1] G2[x2] G3[x3]`` of a ``d1 x R1`` slice, an ``R1 x (d2 R2)`` slice and an ``R2 x d3`` slice,
read as ``d1 * d2 * d3`` coordinates, computed as ``G1[x1] (G2[x2] G3[x3])`` over all ids at once (for a large
batch ``G2 G3`` of every ``(x2, x3)`` pair is one matrix product; see :meth:`TTEmbedding.lookup`).

Sizes from the budget: ``n1 d1 R1 + R1 n2 d2 R2 + R2 n3 d3`` floats. The dim's factors are the most balanced three
with the smallest in the middle (the middle core is the one that grows with ``R1 * R2``); the vocabulary's factors
are searched near the cube root of n, and the ranks ``R1, R2`` (each at most the rank its unfolding can use,
``n1 d1`` and ``n3 d3``) are chosen together with them: the most balanced ranks whose size meets the budget
within 1%.

Init: the paper's sampled Gaussian init: each core is drawn from N(0, s^2) with ``s^6 * R1 * R2 = b^2 / 3``, so an
untrained vector's coordinates have the variance of the full table's U(-b, b) (DLRM's b = sqrt(1/n)).

Deviations: two ranks (the paper uses one rank for both inner bonds; a second one is what lets every budget be met
within 1%); dense gradients for the cores (they are small; ``sparse=True`` is refused); no cache of hot rows (the
paper's TT-EmbeddingBag caches the most frequent ids' full vectors).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import BUDGET_TOLERANCE, FLOAT_BYTES, resolve_budget
from compemb.embeddings.base import CompressedEmbedding, init_normal_
from compemb.registry import register

ROW_FACTOR_SPREAD = 4  # vocabulary factors tried on each side of the cube root
# the pair path (G2 G3 for all n2 n3 pairs at once) from n2 n3 <= this x the ids of a batch; measured on the lookup
# benchmark (26 x 2,048 ids, 1M ids, 100x: n2 n3 = 10k) 1.5x faster than per-id products
PAIRS_PER_ID = 8
BROADCAST_LIMIT = 1024  # d1 R1 d2 d3 floats per id up to which G1's product is a broadcast (above: bmm)


def dim_factors(embedding_dim: int) -> tuple[int, int, int]:
    """``(d1, d2, d3)`` with product ``embedding_dim``: the most balanced three, the smallest in the middle.

    >>> dim_factors(16), dim_factors(64), dim_factors(13)
    ((4, 2, 2), (4, 4, 4), (13, 1, 1))
    """
    d = embedding_dim
    best: tuple[int, int, int] = (d, 1, 1)
    for a in range(1, d + 1):
        for b in range(a, d // a + 1):
            if d % (a * b) == 0 and d // (a * b) >= b:
                triple = (a, b, d // (a * b))
                if triple[2] - triple[0] < max(best) - min(best):
                    best = triple
    small, mid, large = sorted(best)
    return large, small, mid


def tt_sizes(
    num_embeddings: int, embedding_dim: int, budget_floats: float
) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """``((n1, n2, n3), (R1, R2))``: vocabulary factors and ranks whose cores' size is nearest ``budget_floats``.

    Among sizes within 1% of the budget the most balanced ranks and factors win; when none is, the nearest size (the caller's
    budget check then names what can be met).

        >>> tt_sizes(1_000_000, 16, 160_000)
        ((101, 99, 101), (27, 27))
    """
    n = num_embeddings
    d1, d2, d3 = dim_factors(embedding_dim)
    root = max(1, round(n ** (1 / 3)))
    best: tuple[float, float, tuple[int, int, int], tuple[int, int]] | None = None
    for n1 in range(max(1, root - ROW_FACTOR_SPREAD), root + ROW_FACTOR_SPREAD + 1):
        for n2 in range(max(1, root - ROW_FACTOR_SPREAD), root + ROW_FACTOR_SPREAD + 1):
            n3 = -(-n // (n1 * n2))
            if (n1 - 1) * n2 * n3 >= n or n1 * (n2 - 1) * n3 >= n:  # a smaller factor would do: not a candidate
                continue
            # every R1 at once; R2 the nearest the budget for that R1, both within what their unfoldings can use
            r1 = np.arange(1, n1 * d1 + 1, dtype=np.float64)
            r2 = np.clip(np.rint((budget_floats - n1 * d1 * r1) / (r1 * n2 * d2 + n3 * d3)), 1, n3 * d3)
            size = n1 * d1 * r1 + r1 * n2 * d2 * r2 + r2 * n3 * d3
            error = np.abs(size - budget_floats) / budget_floats
            # within the tolerance (with a margin) the most balanced ranks and factors; otherwise the nearest size
            imbalance = np.abs(np.log(r1 / r2)) + math.log(max(n1, n2, n3) / min(n1, n2, n3))
            score = np.where(error <= BUDGET_TOLERANCE / 2, imbalance, 1e6 + error)
            i = int(np.argmin(score))
            candidate = (float(score[i]), float(error[i]), (n1, n2, n3), (int(r1[i]), int(r2[i])))
            if best is None or candidate[:2] < best[:2]:
                best = candidate
    assert best is not None
    return best[2], best[3]


@register("tt")
class TTEmbedding(CompressedEmbedding):
    """TT-Rec: the table as a train of three cores, vocabulary and dim factorised; ranks from the budget.

    Sizes: ``n1 d1 R1 + R1 n2 d2 R2 + R2 n3 d3`` floats (see the module docstring for how the factors and ranks
    are chosen); budgets from the rank-1 train's size up to the full table's are met within 1% (with ranks this
    small the steps between sizes can be wider, and the error names the nearest size).

    Example::

        >>> emb = TTEmbedding(1_000_000, 16, compression=100)
        >>> emb.row_factors, emb.dim_factors, emb.ranks
        ((101, 99, 101), (4, 2, 2), (27, 27))
    """

    title = "TT-Rec: tensor-train cores"
    formula = "n1 d1 R1 + R1 n2 d2 R2 + R2 n3 d3"

    sparse_gradients = False  # an MLP / tensor-train cores: every gradient is dense
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
        n, d = self.num_embeddings, self.embedding_dim
        self.dim_factors = dim_factors(d)
        self.row_factors, self.ranks = tt_sizes(n, d, budget.num_bytes / FLOAT_BYTES)
        (n1, n2, n3), (d1, d2, d3), (r1, r2) = self.row_factors, self.dim_factors, self.ranks
        # each core stored as a table of its slices, one row per digit value, so a gather reads a whole slice
        self.core1 = torch.nn.Parameter(torch.empty(n1, d1 * r1, device=device))
        self.core2 = torch.nn.Parameter(torch.empty(n2, r1 * d2 * r2, device=device))
        self.core3 = torch.nn.Parameter(torch.empty(n3, r2 * d3, device=device))
        a, b, c = tt_sizes(n, d, 1.0)[0]  # the budget nearest nothing: the smallest rank-1 train
        smallest = a * d1 + b * d2 + c * d3
        self._finish(budget, seed, smallest, largest_params=n * d)

    def reset_tables(self) -> None:
        r1, r2 = self.ranks
        # the product of three N(0, s^2) factors summed over R1 * R2 bond pairs has variance R1 R2 s^6
        std = (self.init_bound**2 / 3 / (r1 * r2)) ** (1 / 6)
        for stream, core in enumerate((self.core1, self.core2, self.core3)):
            init_normal_(core, std, self._generator(stream))

    def lookup(self, ids: Tensor) -> Tensor:
        (_, n2, n3), (d1, d2, d3), (r1, r2) = self.row_factors, self.dim_factors, self.ranks
        count = ids.numel()
        high, low = ids.div(n3, rounding_mode="floor"), ids.remainder(n3)
        first, middle = high.div(n2, rounding_mode="floor"), high.remainder(n2)
        # dense gradients (sparse=True is refused): the cores are small, so their dense gradient (an index_add
        # into a few hundred rows) is cheaper than a sparse one of every looked-up slice
        g1 = F.embedding(first, self.core1).view(count, d1, r1)
        if n2 * n3 <= PAIRS_PER_ID * count:
            # a batch that reads many (x2, x3) pairs: G2 G3 for every pair in one matrix product (efficient), then
            # a gather of each id's R1 x (d2 d3) slice; per-id batched products of tiny matrices run far slower
            core3 = self.core3.view(n3, r2, d3).permute(1, 0, 2).reshape(r2, n3 * d3)
            pairs = (self.core2.view(n2 * r1 * d2, r2) @ core3).view(n2, r1, d2, n3, d3)
            pairs = pairs.permute(0, 3, 1, 2, 4).reshape(n2 * n3, r1 * d2 * d3)
            right = F.embedding(middle * n3 + low, pairs).view(count, r1, d2 * d3)
        else:  # few ids: each one's G2 slice times its G3 slice
            g2 = F.embedding(middle, self.core2).view(count, r1 * d2, r2)
            g3 = F.embedding(low, self.core3).view(count, r2, d3)
            right = torch.bmm(g2, g3).view(count, r1, d2 * d3)
        if d1 * r1 * d2 * d3 <= BROADCAST_LIMIT:  # G1 times that: for small ranks a broadcast product beats bmm's
            return (g1.unsqueeze(-1) * right.unsqueeze(1)).sum(2).view(count, d1 * d2 * d3)  # per-matrix CPU loop
        return torch.bmm(g1, right).view(count, d1 * d2 * d3)  # large ranks: the broadcast's temporary is too big

    def describe_sizes(self) -> str:
        """The factors and ranks the budget chose, in a line (for ``compemb methods``)."""
        rows = " x ".join(f"{f:,}" for f in self.row_factors)
        dims = " x ".join(str(f) for f in self.dim_factors)
        return f"ids {rows}, dim {dims}, ranks {self.ranks[0]}, {self.ranks[1]}"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ranks={self.ranks}"


def tt_flops_per_id(module: TTEmbedding) -> int:
    """Multiply-adds per id of the per-id path: ``R1 d2 R2 d3`` (G2 slice times G3 slice) + ``d1 R1 d2 d3`` (G1 times
    that). The pair path computes ``G2 G3`` once per batch for all ``n2 n3`` pairs instead of per id."""
    (d1, d2, d3), (r1, r2) = module.dim_factors, module.ranks
    return r1 * d2 * r2 * d3 + d1 * r1 * d2 * d3
