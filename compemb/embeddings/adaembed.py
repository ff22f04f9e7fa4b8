"""AdaEmbed: "AdaEmbed: Adaptive Embedding for Large-Scale Recommendation Models", Lai et al., OSDI 2023.

A fixed number of rows, reallocated every few steps to the ids of highest importance (one of CAFE's baselines).
Deviations: importance is compemb's normalised output-gradient norm (see :mod:`compemb.embeddings.adaptive`), and
ids without a row read a small hashed fallback table instead of one shared row (the class docstring says why).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, MemoryReport, every_budget_from, resolve_budget, rows_for
from compemb.embeddings.adaptive import AdaptiveEmbedding, memory_report, reset_optimizer_rows
from compemb.embeddings.base import init_uniform_
from compemb.embeddings.id_map import NO_ID, search_rows
from compemb.hashing import UniversalHash, coefficient_bytes
from compemb.registry import register


@register("adaembed")
class AdaEmbed(AdaptiveEmbedding):
    """AdaEmbed: ``R`` rows, reallocated every ``interval`` steps to the ids of highest importance.

    Every id has a float32 importance score (the per-id bookkeeping, ``4n`` bytes, counted as sketch bytes):
    each step adds each occurrence's score (output-gradient norm normalised to mean 1, or 1 for frequency) and
    decays all scores by ``decay`` (done lazily: new scores are scaled up instead). Every ``interval`` steps the
    ``R`` ids of highest score (above 0) own the rows: owners that stay keep their rows, dropped owners lose
    theirs (the learned row is discarded, as the paper evicts), and newcomers take the freed rows, starting from
    their fallback vector so their output does not move. Ids without a row read a small hashed fallback table
    (``fallback_share`` of the float budget), which keeps cold ids apart better than one shared row. The map
    id -> row is the owners' sorted ids (int64) and rows (int32): ``12R`` index bytes, less than a per-id map
    whenever ``R < n / 3``. A budget under the per-id bookkeeping (4 bytes per id: compression 100 of a dim-16
    table leaves 0.64) is refused with a BudgetError. Steps are counted by updates: as for CAFE, call
    ``on_step_end(step, optimizer)`` after ``optimizer.step()`` (rows given to newcomers then have their optimizer
    state reset), or let the next forward apply them.

    Args:
        fallback_share: the part of what the bookkeeping leaves that goes to the fallback table (default 0.2).
        importance: ``"gradient"`` (default) or ``"frequency"``.
        decay: score decay per step (default 0.99).
        interval: steps between reallocations (default 100).

    Example::

        >>> emb = AdaEmbed(100_000, 16, compression=4)
        >>> emb.rows, emb.fallback_rows, emb.memory().sketch_bytes
        (12631, 3750, 400008)
    """

    training_only_state = ("scores", "scale", "steps")  # the per-id importance scores and their decay

    num_embeddings: int  # a closed vocabulary: __init__ takes an int

    # buffers, registered in __init__
    scores: Tensor
    scale: Tensor
    steps: Tensor
    sorted_ids: Tensor
    sorted_rows: Tensor

    per_id_bytes = 4
    title = "AdaEmbed: rows follow importance"
    formula = "R * d + fallback * d + n scores"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        fallback_share: float = 0.2,
        importance: str = "gradient",
        decay: float = 0.99,
        interval: int = 100,
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
        self._start_recording(importance)
        if not 0 < fallback_share < 1:
            raise ValueError(f"{self._who()}: fallback_share must be in (0, 1), got {fallback_share!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"{self._who()}: decay must be in (0, 1], got {decay!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"{self._who()}: interval must be a positive int, got {interval!r}")
        self.fallback_share, self.decay, self.interval = float(fallback_share), float(decay), interval
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        n, d = self.num_embeddings, self.embedding_dim
        bookkeeping = 4 * n + 8 + 8  # scores, the lazy-decay scale, the step count
        hash_bytes = coefficient_bytes(1)
        row_bytes = d * FLOAT_BYTES + 12
        left = budget.num_bytes - bookkeeping - hash_bytes
        self.rows = max(1, int(left * (1 - self.fallback_share) // row_bytes))
        reserved = bookkeeping + hash_bytes + self.rows * row_bytes
        self.fallback_rows = rows_for(budget, d, reserved)
        self.hash = UniversalHash(self.fallback_rows, seed=seed, device=device)
        self.weight = torch.nn.Parameter(torch.empty(self.rows + self.fallback_rows, d, device=device))
        self.register_buffer("scores", torch.empty(n, device=device))
        self.register_buffer("scale", torch.empty(1, dtype=torch.float64, device=device))
        self.register_buffer("steps", torch.empty(1, dtype=torch.int64, device=device))
        self.register_buffer("sorted_ids", torch.empty(self.rows, dtype=torch.int64, device=device))
        self.register_buffer("sorted_rows", torch.empty(self.rows, dtype=torch.int32, device=device))
        smallest = bookkeeping + hash_bytes + row_bytes + d * FLOAT_BYTES
        self._finish(budget, seed, math.ceil(smallest / FLOAT_BYTES), every_budget_from(d, smallest))

    def reset_tables(self) -> None:
        init_uniform_(self.weight, self.init_bound, self._generator())
        self.scores.zero_()
        self.scale.fill_(1)
        self.steps.zero_()
        self.sorted_ids.fill_(NO_ID)
        self.sorted_rows.copy_(torch.arange(self.rows, dtype=torch.int32))
        self._pending = []
        self._host_counts: tuple[int, float] | None = (0, 1.0)
        self.reallocations = 0

    def progress(self) -> dict[str, int]:
        """How many reallocations this process has run."""
        return {"reallocations": self.reallocations}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_counts = None

    def memory(self) -> MemoryReport:
        """Rows as floats, the map and hash as index bytes, the per-id scores (and their scale) as sketch bytes."""
        return memory_report(self, sketch=("scores", "scale"))

    def _vectors(self, ids: Tensor) -> Tensor:
        rows = search_rows(ids, self.sorted_ids, self.sorted_rows, self.hash, self.rows)
        return F.embedding(rows, self.weight, sparse=self.sparse)

    def capture_refusal(self) -> str | None:
        return "reallocates on a step count it keeps on the host"

    @torch.no_grad()
    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        # the step count and scale are known on the host too (read from the buffers only after a load): deciding
        # on them from the buffers would make a GPU host wait every step
        if self._host_counts is None:
            self._host_counts = (int(self.steps), float(self.scale))
        steps, scale = self._host_counts[0] + 1, self._host_counts[1] / self.decay
        self.steps += 1
        self.scale /= self.decay  # decaying every score = scaling every new one up
        added = torch.ones(ids.shape, dtype=torch.float64, device=ids.device) if scores is None else scores.double()
        self.scores.index_add_(0, ids.to(self.scores.device), (added * self.scale).to(self.scores.dtype))
        if scale > 1e30:  # renormalise long before float32 overflows
            self.scores.mul_(1 / scale)
            self.scale.fill_(1)
            scale = 1.0
        self._host_counts = (steps, scale)
        if steps % self.interval == 0:
            self.reallocate(optimizer)
            self.reallocations += 1

    @torch.no_grad()
    def reallocate(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give the rows to the ``R`` ids of highest score now (called every ``interval`` steps)."""
        count = min(self.rows, int((self.scores > 0).sum()))
        top = torch.topk(self.scores, count).indices
        taken = self.sorted_ids != NO_ID
        owners, owner_rows = self.sorted_ids[taken], self.sorted_rows[taken].long()
        stay = torch.isin(owners, top)
        newcomers = top[~torch.isin(top, owners)]
        free = torch.sort(torch.cat([self.sorted_rows[~taken].long(), owner_rows[~stay]])).values
        new_rows, spare = free[: newcomers.numel()], free[newcomers.numel() :]
        fallback = self.hash(newcomers).squeeze(-1) + self.rows
        self.weight.index_copy_(0, new_rows, self.weight[fallback])
        reset_optimizer_rows(optimizer, self.weight, new_rows)
        ids = torch.cat([owners[stay], newcomers, torch.full_like(spare, NO_ID)])
        rows = torch.cat([owner_rows[stay], new_rows, spare])
        order = torch.sort(ids, stable=True).indices
        self.sorted_ids.copy_(ids[order])
        self.sorted_rows.copy_(rows[order])

    def owners(self) -> tuple[Tensor, Tensor]:
        """The ids that own rows and their rows (int64), sorted by id."""
        taken = self.sorted_ids != NO_ID
        return self.sorted_ids[taken], self.sorted_rows[taken].long()

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", rows={self.rows}, fallback_rows={self.fallback_rows}"
        return (
            text
            + f", interval={self.interval}"
            + (f", importance={self.importance!r}" if self.importance != "gradient" else "")
        )
