"""Hot rows for important ids, hashed rows for the rest: CAFE and CAFE-ML.

- ``cafe``: "CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models", Zhang et
  al., SIGMOD 2024 (arXiv 2312.03256). A HotSketch scores ids during training; an id whose score reaches the
  threshold gets a row of its own in a hot table while one is free, the rest share a hashed table.
- ``cafe-ml``: CAFE's multi-level hash embedding: medium ids (score >= 0.2 x threshold) read the sum of one row
  from each of two hashed tables, cold ids one row.

CAFE's two baselines live beside it: ``offline`` (:mod:`compemb.embeddings.offline`) and ``adaembed``
(:mod:`compemb.embeddings.adaembed`).

Choices where the papers leave room (each class's docstring says more):

- Importance is recorded by a hook on the module's own output and applied after the optimizer step
  (:class:`~compemb.embeddings.adaptive.AdaptiveEmbedding`): an occurrence scores the L2 norm of its output
  gradient, normalised to mean 1 over the batch (or 1, with ``importance="frequency"``).
- Thresholds are in compemb's units: an occurrence at its batch's mean gradient norm scores 1, so ``threshold``
  is "this many average occurrences of evidence". The sketch decays once per ``10 x threshold x buckets`` of
  inserted score, so an id with a share p of the score settles near ``1000 p x threshold x buckets`` and stays hot
  while p >= ~1 / (1000 buckets), whatever the threshold: the threshold only sets how much evidence an id gathers
  before it takes a free row (lower: rows fill sooner, from noisier ranks). The defaults per budget are in
  :mod:`compemb.embeddings.cafe_settings`.
- Hot, hashed and fallback rows are one stored table (hot rows first): one gather per lookup, one gradient.
- The HotSketch holds ``sketch_slots_per_row`` = 4 slots per hot row (H buckets of 4 slots), room for the hot ids
  and three candidates per hot row; its bytes count in the budget as sketch bytes.
- A row that changes owner has its optimizer state reset (:func:`~compemb.embeddings.adaptive.reset_optimizer_rows`)
  when ``on_step_end`` is given the optimizer; updates applied at the next forward have no optimizer to reset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, MemoryReport, every_budget_from, resolve_budget, rows_for
from compemb.embeddings.adaptive import AdaptiveEmbedding, memory_report, reset_optimizer_rows
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.embeddings.cafe_kernels import cafe_rows, hot_candidates
from compemb.embeddings.cafe_settings import budget_ratio, default_settings
from compemb.hashing import UniversalHash, coefficient_bytes
from compemb.registry import register
from compemb.table_batch import SeparateLookups
from compemb.sketch.hotsketch import SLOT_BYTES, HotSketch

SKETCH_SLOTS = 4  # slots per HotSketch bucket, as in the paper
OWNER_BYTES = 8 + 1  # per hot row: its owner id (int64) and whether it has one (bool)
_NO_WEIGHTS = np.empty((0, 2), dtype=np.float32)


def _hot_candidates_torch(ids: Tensor, scores: Tensor, hot: Tensor, threshold: float, limit: int) -> Tensor:
    """:func:`~compemb.embeddings.cafe_kernels.hot_candidates` in torch ops (the same positions), for any device."""
    eligible = ((scores >= threshold) & (hot < 0)).nonzero().squeeze(-1)
    if eligible.numel() == 0 or limit == 0:
        return eligible[:limit]
    positions = eligible[torch.argsort(ids[eligible], stable=True)]  # equal ids keep their batch order
    sorted_ids = ids[positions]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    distinct = positions[first]  # each id's first position
    return distinct[torch.argsort(-scores[distinct], stable=True)[:limit]]  # equal scores stay in id order


class _CAFE(AdaptiveEmbedding):
    """The CAFE family: ``H`` hot rows owned through a HotSketch, then one or two hashed tables."""

    open_vocabulary = True
    training_only_state = ("sketch.mass",)  # how much score was inserted since the last decay

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        levels: int,
        compression: float | None,
        num_params: int | None,
        hash_rate: float | None,
        threshold: float | None,
        tuning: str,
        importance: str,
        decay: float,
        sketch_slots_per_row: float,
        merge_on_demote: bool,
        medium_fraction: float = 0.2,
        hash_split: float = 0.7,
        seed: int,
        mode: str,
        sparse: bool,
        name: str | None,
        init: str,
        device: torch.device | str | None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, mode=mode, sparse=sparse, name=name, init=init)
        self._start_recording(importance)
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        ratio = budget_ratio(budget, self.num_embeddings, self.embedding_dim)
        try:
            default_rate, default_threshold = default_settings(
                ratio, tuning, rows=budget.num_bytes / (self.embedding_dim * FLOAT_BYTES))
        except ValueError as error:
            raise ValueError(f"{self.method_name}: {error}") from None
        self.tuning = tuning
        self.hash_rate = default_rate if hash_rate is None else float(hash_rate)
        self.threshold = default_threshold if threshold is None else float(threshold)
        for option, value in (("hash_rate", self.hash_rate), ("hash_split", hash_split),
                              ("medium_fraction", medium_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"{self.method_name}: {option} must be in (0, 1), got {value!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"{self.method_name}: threshold must be positive, got {threshold!r}")
        if not sketch_slots_per_row > 0:
            raise ValueError(f"{self.method_name}: sketch_slots_per_row must be positive, got {sketch_slots_per_row!r}")
        self.levels, self.merge_on_demote = levels, bool(merge_on_demote)
        self.medium_fraction, self.hash_split = float(medium_fraction), float(hash_split)
        self.sketch_slots_per_row, self.decay = float(sketch_slots_per_row), float(decay)
        d = self.embedding_dim
        row_bytes = d * FLOAT_BYTES * (2 if self.merge_on_demote else 1) + OWNER_BYTES  # + its start value
        hash_bytes = coefficient_bytes(levels)
        sketch_fixed = HotSketch.bytes_for(0)
        # hot rows and the sketch share (1 - hash_rate) of the budget, sized together
        per_row = row_bytes + self.sketch_slots_per_row * SLOT_BYTES
        self.hot_rows = max(1, int(((1 - self.hash_rate) * budget.num_bytes - sketch_fixed) // per_row))
        buckets = max(1, math.ceil(self.hot_rows * self.sketch_slots_per_row / SKETCH_SLOTS))
        reserved = self.hot_rows * row_bytes + HotSketch.bytes_for(buckets) + hash_bytes
        # the hashed tables take the rest, so the total lands within half a row of the budget
        hashed = rows_for(budget, d, reserved)
        first = hashed if levels == 1 else max(1, min(hashed - 1, round(hashed * self.hash_split)))
        self.hashed_rows = (first,) if levels == 1 else (first, max(1, hashed - first))
        self.hashes = torch.nn.ModuleList(
            UniversalHash(rows, seed=seed, stream=level, device=device) for level, rows in enumerate(self.hashed_rows)
        )
        self.sketch = HotSketch(buckets, SKETCH_SLOTS, threshold=self.threshold, decay_factor=self.decay, seed=seed,
                                device=device)
        total_rows = self.hot_rows + sum(self.hashed_rows)
        self._offsets = (self.hot_rows, self.hot_rows + self.hashed_rows[0])  # where each hashed table starts
        self.weight = torch.nn.Parameter(torch.empty(total_rows, d, device=device))
        self.register_buffer("owner", torch.empty(self.hot_rows, dtype=torch.int64, device=device))
        self.register_buffer("owned", torch.empty(self.hot_rows, dtype=torch.bool, device=device))
        if self.merge_on_demote:
            self.register_buffer("start", torch.empty(self.hot_rows, d, device=device))
        self._mass_seen: float | None = None  # the sketch's decay mass after the last update
        smallest = row_bytes + HotSketch.bytes_for(1) + hash_bytes + levels * d * FLOAT_BYTES
        self._finish(budget, seed, math.ceil(smallest / FLOAT_BYTES), every_budget_from(d, smallest))

    def reset_tables(self) -> None:
        init_uniform_(self.weight, self.init_bound, self._generator())
        if self.levels == 2:  # only medium ids add a second-level row: from zero, so becoming medium is no jump
            with torch.no_grad():
                self.weight[self._offsets[1] :].zero_()
        self.sketch.reset()
        self.owner.zero_()
        self.owned.zero_()
        if self.merge_on_demote:
            self.start.zero_()
        self._pending, self._mass_seen = [], None

    def memory(self) -> MemoryReport:
        """Hot and hashed rows (and start values) as floats, owners and hashes as index bytes, the sketch apart."""
        return memory_report(self, sketch=("sketch.",), floats=("start",))

    # --- routing -----------------------------------------------------------------------------------------

    def _route(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows ``(N, levels)`` of each id, and with two levels their weights ``(N, 2)``: 1, and 1 if medium."""
        if not (ids.is_cpu and self.sketch._compiled):
            return self._route_torch(ids)
        # on CPU one compiled pass over the sketch and the hashes (5x faster than the torch ops)
        rows = torch.empty(ids.numel(), self.levels, dtype=torch.int64)
        weights = torch.empty(ids.numel(), 2) if self.levels == 2 else None
        keys, scores, hot, occupied, _, sketch_coefficients = self.sketch._arrays()
        cafe_rows(ids.numpy(), keys, scores, hot, occupied, sketch_coefficients,
                  np.concatenate([h.coefficients.numpy() for h in self.hashes]),
                  np.array(self.hashed_rows, dtype=np.int64), np.array(self._offsets, dtype=np.int64),
                  self.medium_fraction * self.threshold, rows.numpy(), _NO_WEIGHTS if weights is None else weights.numpy())
        return rows, weights

    def _route_torch(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`_route` in torch ops, reading the sketch where it lives (with the weights: no trip to the host)."""
        score, hot = self.sketch.query(ids)
        hot = hot.long()
        first = torch.where(hot >= 0, hot, self.hashes[0](ids).squeeze(-1) + self._offsets[0])
        if self.levels == 1:
            return first.unsqueeze(-1), None
        second = self.hashes[1](ids).squeeze(-1) + self._offsets[1]
        medium = (hot < 0) & (score >= self.medium_fraction * self.threshold)
        return torch.stack([first, second], -1), torch.stack([torch.ones_like(score), medium.to(score.dtype)], -1)

    def _vectors(self, ids: Tensor) -> Tensor:
        rows, weights = self._route(ids)
        if weights is None:
            return F.embedding(rows.squeeze(-1), self.weight, sparse=self.sparse)
        # a bag of two rows per id, the second weighted 1 for medium ids and 0 otherwise: one fused gather
        return F.embedding_bag(rows, self.weight, mode="sum", per_sample_weights=weights.to(self.weight.dtype),
                               sparse=self.sparse)

    # --- updates ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        sketch = self.sketch
        # the sketch lives with the weights: on a GPU nothing is copied to the host but a few counts
        ids, scores = ids.to(sketch.keys.device), None if scores is None else scores.to(sketch.keys.device)
        # the level each id was read at (cafe-ml): where a row it gets now starts
        before = sketch.query(ids)[0] if self.levels == 2 else None
        # scores only fall when they decay: since the last update (decay() or a load restarts the mass), or
        # during this insert
        decayed = sketch.mass_since_decay() != self._mass_seen
        # scores of mean 1 per batch sum to the number of occurrences: count exactly that towards the decay
        decayed = sketch.insert(ids, scores, mass=None if scores is None else float(ids.numel())) > 0 or decayed
        self._mass_seen = sketch.mass_since_decay()
        if decayed:
            self._demote()
        free = (~self.owned).nonzero().squeeze(-1)
        if free.numel():  # promotions: the best candidates of this batch take the free rows
            now, hot = sketch.query(ids)
            if sketch._compiled:
                picked = torch.from_numpy(hot_candidates(ids.numpy(), now.numpy(), hot.numpy(), self.threshold,
                                                         free.numel()))
            else:
                picked = _hot_candidates_torch(ids, now, hot, self.threshold, free.numel())
            if picked.numel():
                medium = None if before is None else before[picked] >= self.medium_fraction * self.threshold
                self._promote(ids[picked], free[: picked.numel()], medium, optimizer)

    def _demote(self) -> None:
        """Hot ids whose score fell below the threshold give their rows back."""
        gone_ids, gone_rows = self.sketch.hot_below()
        if gone_ids.numel() == 0:
            return
        self.sketch.clear_hot(gone_ids)
        rows = gone_rows.to(self.weight.device, torch.long)
        if self.merge_on_demote:  # what the id learned while hot goes back into its first hashed row
            first = self.hashes[0](gone_ids.to(self.weight.device)).squeeze(-1) + self._offsets[0]
            self.weight.index_add_(0, first, self.weight[rows] - self.start[rows])
        self.owned[rows] = False

    def _promote(
        self, ids: Tensor, rows: Tensor, medium: Tensor | None, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Give ``rows`` to ``ids`` (distinct, not hot), each starting as the vector the id was reading."""
        device = self.weight.device
        on_device = ids.to(device)
        start = self.weight[self.hashes[0](on_device).squeeze(-1) + self._offsets[0]]
        if medium is not None:  # a medium id was reading its second row too
            second = self.hashes[1](on_device).squeeze(-1) + self._offsets[1]
            start += self.weight[second] * medium.to(device, start.dtype).unsqueeze(-1)
        self.weight.index_copy_(0, rows, start)
        if self.merge_on_demote:
            self.start.index_copy_(0, rows, start)
        self.sketch.set_hot(ids, rows.int())
        self.owner[rows] = on_device
        self.owned[rows] = True
        reset_optimizer_rows(optimizer, self.weight, rows)

    def hot_ids(self) -> tuple[Tensor, Tensor]:
        """The ids that own hot rows and their rows (int64, on the module's device), in row order."""
        rows = self.owned.nonzero().squeeze(-1)
        return self.owner[rows], rows

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._mass_seen = None

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> SeparateLookups:
        """CAFE tables keep their own compiled lookups; their weights are packed, so RowAdam updates them in one pass."""
        return SeparateLookups(tables, ["weight"])

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", hot_rows={self.hot_rows}, hashed_rows={self.hashed_rows}"
        text += f", sketch_buckets={self.sketch.num_buckets}, threshold={self.threshold:g}"
        text += f", importance={self.importance!r}" if self.importance != "gradient" else ""
        return text + (", merge_on_demote=True" if self.merge_on_demote else "")


@register("cafe")
class CAFEEmbedding(_CAFE):
    """CAFE: ids scored by a HotSketch; hot ids read a row of their own, the rest a shared hashed row.

    Importance is each occurrence's output-gradient norm, normalised to mean 1 per batch (or 1 per occurrence),
    recorded by a hook on the output and applied after the optimizer step (see the module docstring). Then:
    an id whose score reaches ``threshold`` takes a free hot row, which starts as a copy of the hashed row it was
    reading, so its output does not move; a hot id whose decayed score falls below ``threshold`` gives its row
    back (and with ``merge_on_demote``, what it learned while hot, its row minus its start value, is added to its
    hashed row; the start values cost ``d`` floats per hot row, counted). The highest scores are served first
    when rows run short. The sketch (``H`` buckets of 4 slots for ``H`` hot rows: room for every hot id and three
    times as many candidates) never evicts a hot id, so no id holds two rows; its map id -> row and the table's
    ``owner`` map row -> id always agree. All of it (sketch, owners, tables) is buffers: ``state_dict`` holds it.

    Training: after ``optimizer.step()`` call ``module.on_step_end(step, optimizer)`` (the Trainer does): the
    updates run then, and a row given to a new owner has its optimizer state zeroed (Adam's moments, Adagrad's
    sum back to its initial value; dense or sparse state). A plain loop may skip the call: the updates then run at
    the start of the next forward, with no optimizer to reset. The sketch lives with the weights: on CUDA its
    inserts, queries and promotions run in torch ops on the device (:mod:`compemb.sketch.torch_ops`), reading back
    a few counts per step and no ids.

    Args:
        hash_rate: the share of the budget for hashed rows; the rest holds the hot rows and the sketch.
        threshold: the score that makes an id hot, in average occurrences (see the module docstring).
        tuning: where the defaults of the two come from, per compression ratio: ``"compemb"`` (re-derived in
            compemb's units on synthetic Criteo-like data) or ``"paper"`` (the paper's Criteo table); see
            :func:`default_settings`.
        importance: ``"gradient"`` (default) or ``"frequency"``.
        decay: the sketch's decay factor (scores x0.99 once per ``10 x threshold x buckets`` of score inserted).
        sketch_slots_per_row: sketch slots per hot row (default 4: the hot ids and three times as many candidates).
        merge_on_demote: fold a demoted id's learned change back into its hashed row (default False: dropped).

    Example::

        >>> emb = CAFEEmbedding(100_000, 16, compression=10, tuning="paper")  # hash_rate 0.5, threshold 20 at 10x
        >>> emb.hot_rows, emb.hashed_rows, emb.sketch.num_buckets * emb.sketch.slots, emb.memory().sketch_bytes
        (2269, (5000,), 9076, 154316)
        >>> emb(torch.tensor([5, 2**40])).shape
        torch.Size([2, 16])
    """

    title = "CAFE: sketch hot rows + hashed"
    formula = "H * d + rows * d + sketch(4H slots)"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        hash_rate: float | None = None,
        threshold: float | None = None,
        tuning: str = "compemb",
        importance: str = "gradient",
        decay: float = 0.99,
        sketch_slots_per_row: float = 4,
        merge_on_demote: bool = False,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, levels=1, compression=compression, num_params=num_params,
            hash_rate=hash_rate, threshold=threshold, tuning=tuning, importance=importance, decay=decay,
            sketch_slots_per_row=sketch_slots_per_row, merge_on_demote=merge_on_demote, seed=seed, mode=mode,
            sparse=sparse, name=name, init=init, device=device,
        )


@register("cafe-ml")
class MultiLevelCAFEEmbedding(_CAFE):
    """CAFE-ML: CAFE whose shared rows come in two levels: medium ids read two hashed rows, cold ids one.

    An id not hot is medium while its sketch score is at least ``medium_fraction x threshold`` and reads the sum
    of its row in each hashed table; a cold id reads its row of the first table only. A promoted id's hot row
    starts as the vector it was reading (one or two rows). Otherwise as :class:`CAFEEmbedding`.

    Args:
        medium_fraction: the medium level starts at this fraction of the threshold (default 0.2, the paper's).
        hash_split: the first hashed table's share of the hashed rows (default 0.7; the second gets the rest).
        Others: as :class:`CAFEEmbedding`.

    Example::

        >>> emb = MultiLevelCAFEEmbedding(100_000, 16, compression=10)
        >>> emb.hashed_rows
        (3500, 1500)
    """

    title = "CAFE-ML: hot + 1 or 2 hashed"
    formula = "H * d + (rows1 + rows2) * d + sketch"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        hash_rate: float | None = None,
        threshold: float | None = None,
        tuning: str = "compemb",
        medium_fraction: float = 0.2,
        hash_split: float = 0.7,
        importance: str = "gradient",
        decay: float = 0.99,
        sketch_slots_per_row: float = 4,
        merge_on_demote: bool = False,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, levels=2, compression=compression, num_params=num_params,
            hash_rate=hash_rate, threshold=threshold, tuning=tuning, importance=importance, decay=decay,
            sketch_slots_per_row=sketch_slots_per_row, merge_on_demote=merge_on_demote,
            medium_fraction=medium_fraction, hash_split=hash_split, seed=seed, mode=mode, sparse=sparse, name=name, init=init,
            device=device,
        )
