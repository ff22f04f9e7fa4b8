"""The quotient-remainder trick.

"Compositional Embeddings Using Complementary Partitions for Memory-Efficient Recommendation Systems",
Shi et al., KDD 2020 (arXiv 1909.02107). Id x reads row ``x mod m`` of a remainder table (m rows) and row
``x // m`` of a quotient table (ceil(n/m) rows); the two are combined by ``mult``, ``add`` or ``concat``.
No two ids share both rows, so every id keeps a unique vector.

Choices: the budget sets m (the remainder table is the large one, as in DLRM's QR code); ``concat`` gives each
table half the dims (the quotient ``d // 2``); ``mult`` starts the quotient table at ones, so an untrained model
reads the remainder rows as the hashing trick would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, Budget, every_budget_from, resolve_budget
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.registry import register
from compemb.table_batch import IdRanges, PackedWeights

OPERATIONS = ("mult", "add", "concat")


@dataclass(frozen=True)
class QRSizes:
    """The remainder table's rows (m) for a budget, and the budgets (fp32 values) QR can meet."""

    modulus: int
    smallest: int
    every_budget_from: int
    largest: int


def qr_sizes(num_embeddings: int, quotient_dim: int, remainder_dim: int, budget: Budget) -> QRSizes:
    """Pick m so that ``m * remainder_dim + ceil(n / m) * quotient_dim`` floats are closest to the budget.

    The total is smallest near ``m = sqrt(n * dq / dr)`` and grows beyond it up to ``m = n``; m is searched on
    that growing branch, so the remainder table is the large one.
    """
    n = num_embeddings

    def total(m: int) -> int:
        return m * remainder_dim + math.ceil(n / m) * quotient_dim

    balance = max(1, min(n, round(math.sqrt(n * quotient_dim / remainder_dim))))
    start = min(range(max(1, balance - 2), min(n, balance + 2) + 1), key=total)
    target = budget.num_bytes / FLOAT_BYTES
    low, high = start, n
    while low < high:  # first m on the growing branch whose total reaches the target
        middle = (low + high) // 2
        if total(middle) < target:
            low = middle + 1
        else:
            high = middle
    candidates = [m for m in (low - 1, low, low + 1) if start <= m <= n]
    modulus = min(candidates, key=lambda m: abs(total(m) - target))
    # one more remainder row moves the total by about remainder_dim floats
    return QRSizes(modulus, total(start), every_budget_from(remainder_dim, 0, total(start)), total(n))


@register("qr")
class QREmbedding(CompressedEmbedding):
    """Quotient-remainder embedding of a closed vocabulary.

    Args:
        operation: ``"mult"`` (elementwise product, default), ``"add"`` or ``"concat"``.

    Example::

        >>> emb = QREmbedding(10_000, 16, compression=10, operation="mult")
        >>> emb.remainder.shape, emb.quotient.shape
        (torch.Size([989, 16]), torch.Size([11, 16]))
    """

    title = "quotient-remainder"
    formula = "m * d + ceil(n / m) * d  (concat: d/2 each)"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        operation: str = "mult",
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
        if operation not in OPERATIONS:
            raise ValueError(f"qr: operation must be one of {OPERATIONS}, got {operation!r}")
        if operation == "concat" and embedding_dim < 2:
            raise ValueError("qr: operation 'concat' needs embedding_dim >= 2")
        self.operation = operation
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        quotient_dim = embedding_dim // 2 if operation == "concat" else embedding_dim
        remainder_dim = embedding_dim - quotient_dim if operation == "concat" else embedding_dim
        sizes = qr_sizes(num_embeddings, quotient_dim, remainder_dim, budget)
        self.modulus = sizes.modulus
        quotient_rows = math.ceil(num_embeddings / self.modulus)
        self.remainder = torch.nn.Parameter(torch.empty(self.modulus, remainder_dim, device=device))
        self.quotient = torch.nn.Parameter(torch.empty(quotient_rows, quotient_dim, device=device))
        self._finish(budget, seed, sizes.smallest, sizes.every_budget_from, sizes.largest)

    def reset_tables(self) -> None:
        bound = self.init_bound
        if self.operation == "mult":
            init_uniform_(self.remainder, bound, self._generator(0))
            with torch.no_grad():
                self.quotient.fill_(1.0)
        else:
            # add: the sum of two rows spreads sqrt(2) wider than one
            bound = bound / math.sqrt(2) if self.operation == "add" else bound
            init_uniform_(self.remainder, bound, self._generator(0))
            init_uniform_(self.quotient, bound, self._generator(1))

    def lookup(self, ids: Tensor) -> Tensor:
        remainder = F.embedding(ids % self.modulus, self.remainder, sparse=self.sparse)
        quotient = F.embedding(ids // self.modulus, self.quotient, sparse=self.sparse)
        if self.operation == "mult":
            return remainder * quotient
        if self.operation == "add":
            return remainder + quotient
        return torch.cat([quotient, remainder], dim=-1)

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> _QRTablesBatch | None:
        """QR tables of one operation: one gather of every remainder and quotient row (one buffer where the rows
        have one width: one optimizer update for all)."""
        if len({t.operation for t in tables}) != 1:
            return None
        return _QRTablesBatch(tables)

    @classmethod
    def table_batch_with_full(cls, tables: Sequence[CompressedEmbedding]) -> _QRTablesBatch | None:
        """QR tables and the full tables beside them (a per-feature collection keeps its small features full) as
        one batch: every row in one buffer, one gather, one optimizer update (None where the rows differ in width:
        ``concat``, or operations differ)."""
        qr = [t for t in tables if isinstance(t, QREmbedding)]
        if len({t.operation for t in qr}) != 1 or qr[0].operation == "concat":
            return None
        if len({t.embedding_dim for t in tables}) != 1 or any(t.num_embeddings is None for t in tables):
            return None
        return _QRTablesBatch(tables)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={self.modulus}, operation={self.operation!r}"


class _QRTablesBatch:
    """QR tables (and full tables joined to them, whose row is the id) looked up together: one gather over one
    buffer holding every remainder, quotient and full row where their widths agree (``concat`` with an odd dim:
    remainders and quotients in two), each column combined as its table combines (see :mod:`compemb.table_batch`).
    """

    def __init__(self, tables: Sequence[CompressedEmbedding]) -> None:
        self.tables = list(tables)
        qr = [j for j, t in enumerate(self.tables) if isinstance(t, QREmbedding)]
        full = [j for j in range(len(self.tables)) if j not in set(qr)]
        quotiented = [t for t in self.tables if isinstance(t, QREmbedding)]  # the tables at `qr`
        self.operation, self.count = quotiented[0].operation, len(qr)
        entries = (
            [(t, "remainder") for t in quotiented]
            + [(t, "quotient") for t in quotiented]
            + [(self.tables[j], "weight") for j in full]
        )
        sparse = self.tables[0].sparse
        if len({getattr(module, name).shape[1] for module, name in entries}) == 1:
            self.packs = [PackedWeights([m for m, _ in entries], [n for _, n in entries], sparse=sparse)]
        else:  # (concat with an odd dim; no full table is joined then)
            self.packs = [
                PackedWeights(quotiented, "remainder", sparse=sparse),
                PackedWeights(quotiented, "quotient", sparse=sparse),
            ]
        device = self.packs[0].row_offsets.device
        self.moduli = torch.tensor([t.modulus for t in quotiented], device=device)
        self.qr_columns = torch.tensor(qr, dtype=torch.int64, device=device)
        self.full_columns = torch.tensor(full, dtype=torch.int64, device=device) if full else None
        # table j's column in [QR tables' vectors, full tables' vectors]
        self.order = torch.tensor([(qr + full).index(j) for j in range(len(self.tables))], device=device)
        self.ranges = IdRanges(self.tables)

    def __call__(self, ids: Tensor) -> Tensor:
        self.ranges.check(ids)
        if self.moduli.device != ids.device:
            self.moduli, self.qr_columns, self.order = (
                t.to(ids.device) for t in (self.moduli, self.qr_columns, self.order)
            )
            self.full_columns = None if self.full_columns is None else self.full_columns.to(ids.device)
        joined = self.full_columns is not None
        quotiented = ids.index_select(1, self.qr_columns) if joined else ids
        parts = [quotiented % self.moduli, quotiented // self.moduli]
        if len(self.packs) == 1:
            rows = torch.cat(
                [*parts, ids.index_select(1, self.full_columns)] if self.full_columns is not None else parts, dim=1
            )
            vectors = self.packs[0].gather(rows.add_(self.packs[0].row_offsets).unsqueeze(-1)).squeeze(-2)
            remainder, quotient = vectors[:, : self.count], vectors[:, self.count : 2 * self.count]
        else:
            remainder, quotient = (
                pack.gather((part + pack.row_offsets).unsqueeze(-1)).squeeze(-2)
                for pack, part in zip(self.packs, parts)
            )
        if self.operation == "mult":
            combined = remainder * quotient
        elif self.operation == "add":
            combined = remainder + quotient
        else:
            combined = torch.cat([quotient, remainder], dim=-1)
        if not joined:
            return combined
        return torch.cat([combined, vectors[:, 2 * self.count :]], dim=1).index_select(1, self.order)
