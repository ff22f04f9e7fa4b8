"""MDE: "Mixed Dimension Embeddings with Application to Memory-Efficient Recommendation Systems", Ginart et al.,
ISIT 2021 (arXiv 1909.11810).

The ids are cut into blocks (in a collection: one block per feature) and block b stores ``r_b`` coordinates per id,
projected to d by its own ``r_b x d`` matrix (none when ``r_b = d``). The dims follow the paper's power rule: block
b's per-id query probability ``p_b`` (a one-hot feature is read once per sample, so ``p_b = 1 / (B n_b)``) gives
``r_b = lambda * p_b^alpha``, clipped to ``[1, d]``, with ``lambda`` solved so that the tables and projections
together meet the budget. Larger blocks get fewer coordinates; ``alpha = 0`` is one dim for all, the paper's Criteo
setting is ``alpha = 0.3``.

How the total budget is met: every block but the largest takes its rule's dim rounded down to a whole number, and the
largest block takes the remainder as a fractional dim (its first ids store one more coordinate, as ``lowrank``
does), so the total meets the budget within 1%. With one block (one feature of its own) MDE is a low-rank table.
In an ``EmbeddingCollection``, ``sharing="shared"`` builds one MDE over all features with the features as blocks;
``sharing="per_feature"`` splits the budget across the features' tables by the same rule
(:meth:`MixedDimEmbedding.split_budget`), each feature then a one-block MDE of its share.

Deviations: blocks are contiguous id ranges given by the caller (the paper also splits one feature's ids into
popularity blocks, which needs an id remap of 4 bytes per id: more than the whole budget at 16x and beyond); the
features' query frequencies are equal for one-hot data, so the rule runs on their sizes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import TypedDict, cast

import torch
from torch import Tensor

from compemb.budget import FLOAT_BYTES, nearest_size, resolve_budget
from compemb.embeddings.base import CompressedEmbedding
from compemb.embeddings.full import FullEmbedding
from compemb.embeddings.lowrank import LowRankEmbedding
from compemb.registry import register

DEFAULT_ALPHA = 0.3  # the paper's (and DLRM's --md-temperature) Criteo setting


class _BlockOptions(TypedDict):
    """What every block's table is built with, beyond its size."""

    seed: int
    sparse: bool
    init: str
    device: torch.device | str | None


def _block_floats(sizes: Sequence[int], dims: Sequence[float], embedding_dim: int) -> float:
    """Floats stored by blocks of these sizes and dims: the tables and, below full dim, the projections; a block
    whose table and projection would outgrow its full table (a few ids) is stored full."""
    d = embedding_dim
    return sum(min(n * r + (r * d if r < d else 0), n * d) for n, r in zip(sizes, dims))


def power_rule_dims(sizes: Sequence[int], embedding_dim: int, budget_floats: float, alpha: float) -> list[float]:
    """Real-valued dims ``r_b = clip(lambda * n_b^(-alpha), 1, d)`` whose tables and projections fill the budget.

    ``lambda`` is found by bisection (the stored floats grow with it); a budget under every block at dim 1 gives
    dims of 1, one over every block at full dim gives ``d``.

        >>> [round(r, 2) for r in power_rule_dims([100, 10_000, 1_000_000], 16, 2_500_000, 0.3)]
        [16.0, 9.56, 2.4]
    """
    d = embedding_dim

    def dims(log_scale: float) -> list[float]:
        return [min(float(d), max(1.0, math.exp(log_scale) * n**-alpha)) for n in sizes]

    low, high = -60.0, 60.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if _block_floats(sizes, dims(middle), d) < budget_floats else (low, middle)
    return dims(high)


@register("mde")
class MixedDimEmbedding(CompressedEmbedding):
    """Mixed-dimension embeddings: each block of ids its own dim by the power rule, projected to d.

    Args (beyond the common ones):
        blocks: sizes of the contiguous id blocks, summing to ``num_embeddings`` (an EmbeddingCollection passes its
            features'); default one block.
        alpha: the power rule's temperature (0: one dim for all blocks).

    Sizes: ``sum_b n_b r_b + r_b d`` floats (no projection where ``r_b = d``); every budget from one coordinate per
    id (``n + B d`` floats) to the full table's size is met within 1% (see the module docstring).
    Init: each block as its table kind starts (a full block U(-b, b), a low-dim block as ``lowrank``), at the scale
    b of the module's own full table.

    Example::

        >>> emb = MixedDimEmbedding(1_010_100, 16, compression=8, blocks=[100, 10_000, 1_000_000])
        >>> emb.dims  # 100 ids at full dim, 10,000 at 7 (the rule's 7.7 rounded down), 1M the rest: 1.95
        [16, 7.0, 1.948456]
    """

    title = "MDE: power-rule dims per block"
    formula = "sum_b n_b r_b + r_b d"
    per_id_bytes = FLOAT_BYTES  # one coordinate per id at least
    takes_feature_blocks = True
    block_starts: Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        blocks: Sequence[int] | None = None,
        alpha: float = DEFAULT_ALPHA,
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
        assert self.num_embeddings is not None  # a closed vocabulary: the base class refuses None
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        sizes = [self.num_embeddings] if blocks is None else [int(size) for size in blocks]
        if any(size < 1 for size in sizes) or sum(sizes) != self.num_embeddings:
            raise ValueError(
                f"blocks must be positive sizes summing to num_embeddings {self.num_embeddings:,}, "
                f"got {len(sizes)} blocks summing to {sum(sizes):,}"
            )
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        self.block_sizes, self.alpha = sizes, float(alpha)
        d, floats = self.embedding_dim, budget.num_bytes / FLOAT_BYTES
        rule = power_rule_dims(sizes, d, floats, self.alpha)
        largest = max(range(len(sizes)), key=lambda b: sizes[b])
        # rounded down, so what they leave the largest block is never less than its rule's share
        whole = [min(d, max(1, math.floor(r + 1e-9))) for r in rule]
        others = _block_floats(
            [n for b, n in enumerate(sizes) if b != largest], [r for b, r in enumerate(whole) if b != largest], d
        )
        tables: list[CompressedEmbedding] = []
        for b, size in enumerate(sizes):
            common: _BlockOptions = dict(seed=seed * 1_000 + b, sparse=sparse, init=init, device=device)
            left = floats - others  # the largest block's share: what the others leave
            full_size = size * d
            if (b != largest and whole[b] * (size + d) >= full_size) or (b == largest and left >= full_size):
                tables.append(FullEmbedding(size, d, **common))
                continue
            params = size * whole[b] + whole[b] * d if b != largest else max(1, round(left))
            with nearest_size():  # the module's total is checked below; a low-dim block takes its nearest size
                tables.append(LowRankEmbedding(size, d, num_params=params, **common))
        self.tables = torch.nn.ModuleList(tables)
        self.dims = [t.rank if isinstance(t, LowRankEmbedding) else d for t in tables]
        starts = torch.tensor([0, *itertools.accumulate(sizes)][:-1], dtype=torch.int64, device=device)
        self.register_buffer("block_starts", starts, persistent=False)  # derived from blocks: not stored
        # the smallest: every block at one coordinate per id, each with its 1 x d projection
        self._finish(budget, seed, self.num_embeddings + len(sizes) * d, largest_params=self.num_embeddings * d)

    @classmethod
    def split_budget(
        cls, sizes: Sequence[int], embedding_dim: int, budget_bytes: int, **options: object
    ) -> list[float]:
        """Bytes for each of several features' own tables: the power rule across them (one block each)."""
        alpha = float(options.get("alpha", DEFAULT_ALPHA))  # type: ignore[arg-type]
        dims = power_rule_dims(sizes, embedding_dim, budget_bytes / FLOAT_BYTES, alpha)
        return [FLOAT_BYTES * _block_floats([n], [r], embedding_dim) for n, r in zip(sizes, dims)]

    def reset_tables(self) -> None:
        for table in cast("Iterable[CompressedEmbedding]", self.tables):  # a ModuleList of the blocks' tables
            table.reset_tables()
            # each block was built as a table of its own ids; its ids start at this module's full-table scale
            ratio = self.init_bound / table.init_bound
            if ratio != 1:
                with torch.no_grad():
                    for weight in (
                        getattr(table, "weight", None),
                        getattr(table, "low", None),
                        getattr(table, "extra", None),
                    ):
                        if weight is not None and not weight.is_meta:
                            weight.mul_(ratio)

    def capture_refusal(self) -> str | None:
        if len(self.tables) == 1:
            return None
        return "routes each batch's ids to its blocks by counts read back to the host"

    def lookup(self, ids: Tensor) -> Tensor:
        tables = cast("Sequence[CompressedEmbedding]", self.tables)  # a ModuleList of the blocks' tables
        if len(tables) == 1:
            return tables[0].lookup(ids)
        # route the ids block by block: one stable sort, a contiguous slice per block, then back to input order
        block = torch.bucketize(ids, self.block_starts, right=True) - 1
        order = torch.argsort(block, stable=True)
        # the one value the host needs: how many ids each block's table reads (one read back; bincount would be two)
        counts = (
            torch.zeros(len(tables), dtype=torch.int64, device=ids.device)
            .index_add_(0, block, torch.ones_like(block))
            .tolist()
        )
        local = (ids - self.block_starts[block])[order]
        pieces = [table.lookup(part) for table, part in zip(tables, local.split(counts)) if part.numel()]
        if not pieces:
            return tables[0].lookup(ids)  # no ids: an empty (0, d) of the tables' dtype
        vectors = torch.cat(pieces)
        return torch.zeros_like(vectors).index_copy(0, order, vectors)

    def describe_sizes(self) -> str:
        """The dims the power rule chose, in a line (for ``compemb methods``)."""
        dims = ", ".join(f"{r:g}" for r in self.dims[:8]) + (", ..." if len(self.dims) > 8 else "")
        return f"alpha {self.alpha:g}: {len(self.dims)} block(s) of dims {dims}"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocks={len(self.block_sizes)}, alpha={self.alpha:g}"
