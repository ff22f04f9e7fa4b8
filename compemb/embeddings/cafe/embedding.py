"""Hot rows for important ids, hashed rows for the rest: CAFE and CAFE-ML.

- ``cafe``: "CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models", Zhang et
  al., SIGMOD 2024 (arXiv 2312.03256). A HotSketch scores ids during training; an id whose score reaches the
  threshold gets a row of its own in a hot table while one is free, the rest share a hashed table.
- ``cafe-ml``: CAFE's multi-level hash embedding: medium ids (score >= 0.2 x threshold) read the sum of one row
  from each of two hashed tables, cold ids one row.

CAFE's two baselines live beside it: ``offline`` (:mod:`compemb.embeddings.offline`) and ``adaembed``
(:mod:`compemb.embeddings.adaembed`).

Across fields (``blocks``: an ``EmbeddingCollection`` with ``sharing="shared"`` passes its features' sizes) the
layout is the authors' (HugoZHL/CAFE, ``embeddings/init_embed.py``, ``sk_embedding_bag.py``): one HotSketch and one
hot table shared by every field (the sketch keys ids by their offset in the collection), a hashed table per field
whose rows are the field's share of the hashed budget in proportion to its ids (the authors: ``ceil(rate x
hash_rate x n_f)``), importance normalised per field per batch (``grad_norm x N / sum(grad_norm)`` over the field's
N occurrences), and a field of n ids with ``n <= 400 / (1 + log2(ratio))`` left uncompressed (rows of its own; its
ids never enter the sketch). Remaining deviations: the budget is honest (full fields, sketch, owners, hashes and the
field table all count; the authors size the hot table as ``rate x (1 - hash_rate) x sum n x 4d / (4d + 48)`` and the
full fields come on top); full fields are kept smallest first while they take at most half the budget; the
hashed row is a seeded universal hash of the id (the authors: ``id mod rows``); every table starts at the shared
full table's scale (the authors: per field, ``sqrt(1/n_f)``, and ``sqrt(1/max n)`` for the hot table).
A table of one vocabulary (a per-feature collection, or a standalone table) is one field.

Choices where the papers leave room (each class's docstring says more):

- Importance is recorded by a hook on the module's own output and applied after the optimizer step
  (:class:`~compemb.embeddings.adaptive.AdaptiveEmbedding`): an occurrence scores the L2 norm of its output
  gradient, normalised to mean 1 over its field's occurrences in the batch (or 1, with ``importance="frequency"``).
- Thresholds are in the authors' units, which are compemb's: an occurrence at its field's mean gradient norm in
  the batch scores 1, so ``threshold`` is "this many average occurrences of evidence". The sketch decays once the
  score inserted since its last decay passes ``P = 10 x threshold x buckets``, at most once per batch (as the
  authors' ``batch_insert``), so once per ``max(P, a batch's score)``: an id with a share p of the score settles near
  ``100 p max(P, batch)`` and stays hot while that is >= threshold. (Until 2026-12 compemb decayed once per whole P
  in a batch: ~4 times a batch of 2,048 for a 16-bucket sketch at threshold 3.) The defaults per budget are in
  :mod:`compemb.embeddings.cafe.settings`.
- Hot, hashed and fallback rows are one stored table (hot rows first): one gather per lookup, one gradient.
- The HotSketch holds ``sketch_slots_per_row`` = 4 slots per hot row (H buckets of 4 slots), room for the hot ids
  and three candidates per hot row; its bytes count in the budget as sketch bytes.
- A small table is not starved of its sketch: with the default ``hash_rate`` it keeps at least
  ``min(MIN_HOT_ROWS, as many as a quarter of its budget holds)`` hot rows with their slots (a 4,278-id feature at
  100x: 4 rather than 1); ``hash_rate`` then reports the share the hashed rows are left.
- Where compemb differs from the authors' code and keeps its own way (not measured against theirs): importance is
  inserted after the optimizer step (the authors': before it, ``main.py``), so a promoted id's row starts from its
  shared row as this step left it; a newcomer to a full bucket takes the lowest-scoring slot unless a hot id holds
  it, and is then dropped (Space-Saving, as the paper's text; the authors' code replaces slot 3); CAFE-ML's second
  hashed level is a table per field, as its first level (a design choice of compemb's, so that the levels share one
  layout).
- ``hot_policy="top"`` (compemb's, off by default): on the planted hot set (``benchmarks/premise.sh``) the paper's
  rule hands the hot rows out first come and never takes them back, since an owner's score settles far above the
  threshold, and drops a sketch newcomer whose bucket's lowest slot is hot (15 of 72 planted hot ids never entered
  the sketch). With "top" the rows go to the highest scores above the threshold: a candidate scoring
  :data:`SWAP_GAIN` times the lowest owner's score takes that owner's row (the owner demoted as by a decay), and a
  newcomer takes its bucket's lowest slot without a hot id. Measured in ``benchmarks/results/premise.md``.
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
from compemb.embeddings.cafe.batch import CAFETables
from compemb.embeddings.cafe.kernels import cafe_rows, hot_candidates
from compemb.embeddings.cafe.settings import budget_ratio, default_settings
from compemb.embeddings.fields import plan_fields, split_rows
from compemb.hashing import UniversalHash, coefficient_bytes, hash_high32
from compemb.kernels import on_host
from compemb.registry import register
from compemb.sketch.hotsketch import SLOT_BYTES, HotSketch

SKETCH_SLOTS = 4  # slots per HotSketch bucket, as in the paper
OWNER_BYTES = 8 + 1  # per hot row: its owner id (int64) and whether it has one (bool)
MIN_HOT_ROWS = 16  # a table's default hot rows: at least this many, while they and their sketch fit in a quarter
# "threshold": the paper's (a free row goes to an id reaching the threshold; an owner keeps it until its score decays
# below); "top": the rows go to the highest scores above the threshold (an owner is displaced by a better candidate)
HOT_POLICIES = ("threshold", "top")
# with "top", a candidate displaces an owner only when it scores this many times the owner's score: two ids of
# near-equal score would otherwise trade a row back and forth, each trade restarting it from the shared row
SWAP_GAIN = 1.5
_LOWEST_ID = -(2**63)  # the first field of one vocabulary starts here: any int64 id is in it
_NO_WEIGHTS = np.empty((0, 2), dtype=np.float32)


def _hot_candidates_torch(ids: Tensor, scores: Tensor, hot: Tensor, threshold: float, limit: int) -> Tensor:
    """:func:`~compemb.embeddings.cafe.kernels.hot_candidates` in torch ops (the same positions), for any device."""
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
    """The CAFE family: ``H`` hot rows owned through a HotSketch, then one or two hashed tables (per field, with
    ``blocks``)."""

    open_vocabulary = True
    takes_feature_blocks = True  # a shared collection passes its features' sizes: the authors' per-field layout
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
        hot_policy: str = "threshold",
        medium_fraction: float = 0.2,
        hash_split: float = 0.7,
        blocks: Sequence[int] | None = None,
        field_tables: bool = True,
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
        self._start_recording(importance)
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        ratio = budget_ratio(budget, self.num_embeddings, self.embedding_dim)
        if not isinstance(field_tables, bool):
            raise ValueError(f"{self.method_name}: field_tables must be True or False, got {field_tables!r}")
        try:
            default_rate, default_threshold = default_settings(
                ratio,
                tuning,
                rows=budget.num_bytes / (self.embedding_dim * FLOAT_BYTES),
                per_field=blocks is not None and field_tables,
            )
        except ValueError as error:
            raise ValueError(f"{self.method_name}: {error}") from None
        self.tuning = tuning
        self.hash_rate = default_rate if hash_rate is None else float(hash_rate)
        self.threshold = default_threshold if threshold is None else float(threshold)
        for option, value in (
            ("hash_rate", self.hash_rate),
            ("hash_split", hash_split),
            ("medium_fraction", medium_fraction),
        ):
            if not 0 < value < 1:
                raise ValueError(f"{self.method_name}: {option} must be in (0, 1), got {value!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"{self.method_name}: threshold must be positive, got {threshold!r}")
        if hot_policy not in HOT_POLICIES:
            raise ValueError(
                f"{self.method_name}: hot_policy must be one of {', '.join(HOT_POLICIES)}, got {hot_policy!r}"
            )
        self.hot_policy = hot_policy
        if not sketch_slots_per_row > 0:
            raise ValueError(f"{self.method_name}: sketch_slots_per_row must be positive, got {sketch_slots_per_row!r}")
        self.levels, self.merge_on_demote = levels, bool(merge_on_demote)
        self.medium_fraction, self.hash_split = float(medium_fraction), float(hash_split)
        self.sketch_slots_per_row, self.decay = float(sketch_slots_per_row), float(decay)
        d = self.embedding_dim
        self.field_tables = field_tables
        fields = self._plan_fields(blocks, ratio, budget.num_bytes)
        self.blocks = None if blocks is None else [int(n) for n in blocks]
        field_bytes = 0 if blocks is None else (len(fields) + 1) * 8 + len(fields) + 2 * levels * len(fields) * 8
        full_ids = sum(n for n, full in fields if full)
        row_bytes = d * FLOAT_BYTES * (2 if self.merge_on_demote else 1) + OWNER_BYTES  # + its start value
        hash_bytes = coefficient_bytes(levels)
        sketch_fixed = HotSketch.bytes_for(0)
        fixed = hash_bytes + field_bytes + full_ids * d * FLOAT_BYTES
        # every hashed table needs a row per level (cafe-ml's second level holds 1 - hash_split of the hashed rows)
        tables = sum(not full for _, full in fields) if self.field_tables else 1
        least_hashed = tables if levels == 1 else math.ceil(tables / min(self.hash_split, 1 - self.hash_split))
        if hash_rate is None:  # the default rate leaves every hashed table at least one row per level
            needed = (least_hashed + 1) * d * FLOAT_BYTES / max(1, budget.num_bytes - fixed)
            self.hash_rate = max(self.hash_rate, min(needed, 0.99))
        # hot rows and the sketch share (1 - hash_rate) of the budget (after the fields kept full), sized together
        per_row = row_bytes + self.sketch_slots_per_row * SLOT_BYTES
        self.hot_rows = max(1, int(((1 - self.hash_rate) * (budget.num_bytes - fixed) - sketch_fixed) // per_row))
        if hash_rate is None:  # a small table keeps a sketch worth the name (C26 at 100x: 1 hot row before)
            least = min(MIN_HOT_ROWS, int((budget.num_bytes - fixed) / 4 // per_row))
            if least > self.hot_rows:  # hash_rate is then the share the hashed rows are left
                self.hot_rows = least
                self.hash_rate = 1 - (self.hot_rows * per_row + sketch_fixed) / (budget.num_bytes - fixed)
        buckets = max(1, math.ceil(self.hot_rows * self.sketch_slots_per_row / SKETCH_SLOTS))
        reserved = self.hot_rows * row_bytes + HotSketch.bytes_for(buckets) + fixed
        # the hashed tables take the rest, so the total lands within half a row of the budget
        hashed = rows_for(budget, d, reserved)
        first = hashed if levels == 1 else max(1, min(hashed - 1, round(hashed * self.hash_split)))
        self.hashed_rows = (first,) if levels == 1 else (first, max(1, hashed - first))
        self.hashes = torch.nn.ModuleList(
            UniversalHash(rows, seed=seed, stream=level, device=device) for level, rows in enumerate(self.hashed_rows)
        )
        self.sketch = HotSketch(
            buckets,
            SKETCH_SLOTS,
            threshold=self.threshold,
            decay_factor=self.decay,
            seed=seed,
            device=device,
            skip_hot=hot_policy == "top",
        )
        total_rows = self._lay_out_fields(fields, device)
        self.weight = torch.nn.Parameter(torch.empty(total_rows, d, device=device))
        self.register_buffer("owner", torch.empty(self.hot_rows, dtype=torch.int64, device=device))
        self.register_buffer("owned", torch.empty(self.hot_rows, dtype=torch.bool, device=device))
        if self.merge_on_demote:
            self.register_buffer("start", torch.empty(self.hot_rows, d, device=device))
        self._mass_seen: float | None = None  # the sketch's decay mass after the last update
        smallest = row_bytes + HotSketch.bytes_for(1) + fixed + max(levels, least_hashed) * d * FLOAT_BYTES
        self._finish(budget, seed, math.ceil(smallest / FLOAT_BYTES), every_budget_from(d, smallest))

    def _plan_fields(
        self, blocks: Sequence[int] | None, ratio: float | None, budget_bytes: int
    ) -> list[tuple[int, bool]]:
        """``(ids, kept full)`` per field: one field without ``blocks``; with them the authors' rule (a field of n <=
        400 / (1 + log2(ratio)) ids stays full), smallest first while the full fields take at most half the budget
        (the authors' rule alone can spend all of a small set's budget on them); the largest field is always
        compressed."""
        if blocks is None:
            return [(self.num_embeddings or 0, False)]
        sizes = [int(n) for n in blocks]
        if self.num_embeddings is None or sum(sizes) != self.num_embeddings or min(sizes, default=0) < 1:
            raise ValueError(
                f"{self.method_name}: blocks must be positive field sizes summing to num_embeddings="
                f"{self.num_embeddings}, got {list(blocks)!r}"
            )
        if not self.field_tables:  # one hashed table for every field: none kept full
            return [(n, False) for n in sizes]
        return list(zip(sizes, plan_fields(sizes, self.embedding_dim, ratio, budget_bytes)))

    def _lay_out_fields(self, fields: list[tuple[int, bool]], device: torch.device | str | None) -> int:
        """Rows of ``weight``: hot rows, then each field's level-1 rows (hashed, or its own when kept full), then
        each compressed field's level-2 rows (cafe-ml). The field tables say where; returns the total rows."""
        levels, compressed = self.levels, [n for n, full in fields if not full]
        shares = [split_rows(rows, compressed) for rows in self.hashed_rows]  # each compressed field's rows per level
        rows = torch.zeros(levels, len(fields), dtype=torch.int64)
        offsets = torch.zeros(levels, len(fields), dtype=torch.int64)
        at, taken, level_starts = self.hot_rows, [0] * levels, []
        for level in range(levels):
            level_starts.append(at)
            if not self.field_tables:  # every field reads the same hashed table, keyed by its ids' offsets
                rows[level], offsets[level], at = self.hashed_rows[level], at, at + self.hashed_rows[level]
                continue
            for f, (n, full) in enumerate(fields):
                if full and level == 1:  # a full field's ids are never medium: level 2 repeats level 1, weight 0
                    rows[1, f], offsets[1, f] = rows[0, f], offsets[0, f]
                    continue
                rows[level, f] = n if full else shares[level][taken[level]]
                taken[level] += 0 if full else 1
                offsets[level, f], at = at, at + int(rows[level, f])
        # one vocabulary: one field over every int64 id; with blocks field f starts at the sum of those before it
        starts = (
            torch.tensor([_LOWEST_ID, 2**63 - 1])
            if self.blocks is None
            else torch.tensor([0, *np.cumsum([n for n, _ in fields]).tolist()])
        )
        # derived from the sizes alone, so not saved; kept on the CPU too, to be written again after a meta build
        self._field_layout = {
            "field_starts": starts,
            "field_direct": torch.tensor([full for _, full in fields]),
            "field_rows": rows,
            "field_offsets": offsets,
        }
        for name, value in self._field_layout.items():
            self.register_buffer(name, value.to(device, copy=True), persistent=False)
        # where level 1 and level 2 begin (reset_tables zeroes level 2)
        self._offsets = (self.hot_rows, level_starts[-1])
        self._has_full_fields = any(full for _, full in fields)
        return at

    def reset_tables(self) -> None:
        for name, value in self._field_layout.items():  # (materialised from meta: written afresh)
            getattr(self, name).copy_(value)
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
        """Hot and hashed rows (and start values) as floats, owners, hashes and field tables as index bytes, the
        sketch apart. One vocabulary's field table only restates the sizes (as Python ints do): not counted."""
        report = memory_report(self, sketch=("sketch.",), floats=("start",))
        if self.blocks is None:
            metadata = sum(
                t.numel() * t.element_size() for name, t in self.named_buffers() if name.startswith("field_")
            )
            report = MemoryReport(report.float_bytes, report.index_bytes - metadata, report.sketch_bytes)
        return report

    # --- routing -----------------------------------------------------------------------------------------

    def _route(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows ``(N, levels)`` of each id, and with two levels their weights ``(N, 2)``: 1, and 1 if medium."""
        if not (on_host(ids) and self.sketch._compiled):
            return self._route_torch(ids)
        # on CPU one compiled pass over the sketch and the hashes (5x faster than the torch ops)
        rows = torch.empty(ids.numel(), self.levels, dtype=torch.int64)
        weights = torch.empty(ids.numel(), 2) if self.levels == 2 else None
        keys, scores, hot, occupied, _, sketch_coefficients = self.sketch._arrays()
        cafe_rows(
            ids.numpy(),
            keys,
            scores,
            hot,
            occupied,
            sketch_coefficients,
            np.concatenate([h.coefficients.numpy() for h in self.hashes]),
            self.field_starts.numpy(),
            self.field_direct.numpy(),
            self.field_rows.numpy(),
            self.field_offsets.numpy(),
            self.medium_fraction * self.threshold,
            rows.numpy(),
            _NO_WEIGHTS if weights is None else weights.numpy(),
        )
        return rows, weights

    def _fields(self, ids: Tensor) -> Tensor:
        """Each id's field (0 for every id of one vocabulary)."""
        return torch.searchsorted(self.field_starts[1:-1], ids.contiguous(), right=True)  # (a column: strided)

    def _shared_row(self, ids: Tensor, level: int, field: Tensor | None = None) -> Tensor:
        """The row ``ids`` read at ``level`` when not hot: their field's hashed row, or their own in a full field
        (``field``: the ids' fields, when already known)."""
        field = self._fields(ids) if field is None else field
        rows, start = self.field_rows[level, field], self.field_offsets[level, field]
        bucket = hash_high32(ids, self.hashes[level].coefficients).squeeze(-1).mul_(rows).bitwise_right_shift_(32)
        if not self._has_full_fields:
            return start + bucket
        return start + torch.where(self.field_direct[field], ids - self.field_starts[field], bucket)

    def _route_torch(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`_route` in torch ops, reading the sketch where it lives (with the weights: no trip to the host)."""
        score, hot = self.sketch.query(ids)
        hot = hot.long()
        field = self._fields(ids)
        first = torch.where(hot >= 0, hot, self._shared_row(ids, 0, field))
        if self.levels == 1:
            return first.unsqueeze(-1), None
        second = self._shared_row(ids, 1, field)
        medium = (hot < 0) & (score >= self.medium_fraction * self.threshold)
        return torch.stack([first, second], -1), torch.stack([torch.ones_like(score), medium.to(score.dtype)], -1)

    def _vectors(self, ids: Tensor) -> Tensor:
        rows, weights = self._route(ids)
        if weights is None:
            return F.embedding(rows.squeeze(-1), self.weight, sparse=self.sparse)
        # a bag of two rows per id, the second weighted 1 for medium ids and 0 otherwise: one fused gather
        return F.embedding_bag(
            rows, self.weight, mode="sum", per_sample_weights=weights.to(self.weight.dtype), sparse=self.sparse
        )

    # --- updates ----------------------------------------------------------------------------------------

    def _normalise(self, ids: Tensor, norms: Tensor) -> Tensor | None:
        """Scores of mean 1 per field over the batch, as the authors' ``grad_norm * N / sum(grad_norm)`` per field
        (one field: over the batch); a field whose norms sum to zero or diverged scores 0."""
        if self.blocks is None:
            return super()._normalise(ids, norms)
        field, norms = self._fields(ids.to(self.field_starts.device)), norms.float().to(self.field_starts.device)
        count = self.field_starts.numel() - 1
        sums = torch.zeros(count, dtype=torch.float64, device=norms.device).index_add_(0, field, norms.double())
        occurrences = torch.zeros(count, dtype=torch.float64, device=norms.device).index_add_(
            0, field, torch.ones_like(norms, dtype=torch.float64)
        )  # (bincount would make a GPU host wait)
        mean = sums / occurrences.clamp_min(1)
        usable = torch.isfinite(mean) & (mean > 0)
        return torch.where(
            usable[field], norms / torch.where(usable, mean, 1.0)[field].float(), torch.zeros_like(norms)
        )

    @torch.no_grad()
    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        sketch = self.sketch
        if sketch._merges:
            self._update_fixed(ids, scores, optimizer)
            return
        if self._has_full_fields:  # a field kept full has rows of its own: its ids never enter the sketch
            scored = ~self.field_direct[self._fields(ids.to(self.field_starts.device))].to(ids.device)
            ids, scores = ids[scored], None if scores is None else scores[scored.to(scores.device)]
            if ids.numel() == 0:
                return
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
        top = self.hot_policy == "top"
        if free.numel() or top:  # promotions: the best candidates of this batch take the free rows
            now, hot = sketch.query(ids)
            limit = self.hot_rows if top else free.numel()  # "top": every row may change hands
            if sketch._compiled:
                picked = torch.from_numpy(hot_candidates(ids.numpy(), now.numpy(), hot.numpy(), self.threshold, limit))
            else:
                picked = _hot_candidates_torch(ids, now, hot, self.threshold, limit)
            if picked.numel() > free.numel():  # "top": the candidates past the free rows against the owners
                displaced = self._displaced(now[picked[free.numel() :]])
                self._release(self.owner[displaced], displaced)
                free = torch.cat([free, displaced])
                picked = picked[: free.numel()]
            if picked.numel():
                medium = None if before is None else before[picked] >= self.medium_fraction * self.threshold
                self._promote(ids[picked], free[: picked.numel()], medium, optimizer)

    def _displaced(self, candidates: Tensor) -> Tensor:
        """Rows whose owners the best of ``candidates`` (scores, best first) displace: the i-th best against the
        i-th lowest-scoring owner, while it scores :data:`SWAP_GAIN` times as much (a prefix: the candidates fall,
        the owners rise)."""
        rows = self.owned.nonzero().squeeze(-1)
        scores = self.sketch.query(self.owner[rows].to(self.sketch.keys.device))[0].to(rows.device)
        lowest = torch.argsort(scores, stable=True)[: candidates.numel()]
        beats = candidates[: lowest.numel()].to(rows.device) > SWAP_GAIN * scores[lowest]
        return rows[lowest[: int(beats.sum())]]

    def _update_fixed(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        """:meth:`_update` on the device code path, in fixed shapes (nothing read back): the batch merged into the
        sketch, hot ids below the threshold demoted after a decay (every step where the decay was decided on the
        device), then the best new candidates promoted into free rows, as the host path picks them."""
        sketch = self.sketch
        ids = ids.to(sketch.keys.device)
        scores = None if scores is None else scores.to(sketch.keys.device)
        # a field kept full has rows of its own: its ids never enter the sketch
        keep = ~self.field_direct[self._fields(ids)] if self._has_full_fields else None
        before = sketch.query(ids)[0] if self.levels == 2 else None
        mass: float | Tensor | None = None
        if scores is not None:  # scores of mean 1 sum to the number of occurrences: count exactly that
            mass = float(ids.numel()) if keep is None else keep.sum(dtype=torch.float64)
        # scores only fall when they decay: demote when the host knows they did (or cannot know), as the host path
        known = sketch._known_mass is not None and self._mass_seen is not None
        decayed = not known or sketch._known_mass != self._mass_seen
        decayed = sketch.insert(ids, scores, mass=mass, keep=keep) != 0 or decayed
        self._mass_seen = sketch._known_mass
        if decayed:
            self._demote_fixed()
        now, hot = sketch.query(ids)
        eligible = (now >= self.threshold) & (hot < 0)
        if keep is not None:
            eligible &= keep
        # each eligible id once (in id order), then the best first: the host path's candidates, in its order
        limit = min(ids.numel(), self.hot_rows)
        by_id = torch.sort(torch.where(eligible, ids, torch.iinfo(torch.int64).max), stable=True)
        sorted_ids, position = by_id
        first = eligible[position].clone()
        first[1:] &= sorted_ids[1:] != sorted_ids[:-1]
        ranked = torch.sort(torch.where(first, now[position], -math.inf), descending=True, stable=True)
        chosen = position[ranked.indices[:limit]]
        wanted = ranked.values[:limit] > -math.inf
        if self.hot_policy == "top":  # free rows first, then owned ones from the lowest score up (as the host path)
            owner_scores = sketch.query(self.owner.to(sketch.keys.device))[0].to(self.owned.device)
            order = torch.sort(torch.where(self.owned, owner_scores, -math.inf), stable=True).indices[:limit]
            # an owner is displaced by the candidate of its rank that beats it
            displace = (
                wanted.to(order.device)
                & self.owned[order]
                & (ranked.values[:limit].to(order.device) > SWAP_GAIN * owner_scores[order])
            )
            valid = wanted.to(order.device) & ~self.owned[order] | displace
            self._demote_fixed(torch.zeros_like(self.owned).index_put_((order,), displace))  # distinct rows
        else:
            order = torch.sort(self.owned.to(torch.uint8), stable=True).indices[:limit]  # free rows first, ascending
            valid = wanted & ~self.owned[order]
        new_ids = ids[chosen]
        medium = None if before is None else before[chosen] >= self.medium_fraction * self.threshold
        self._promote_fixed(new_ids, order, valid, medium, optimizer)

    def _demote_fixed(self, displaced: Tensor | None = None) -> None:
        """Hot ids scoring below the threshold (and the owners of ``displaced`` rows, a bool per hot row) give
        their rows back, in fixed shapes."""
        sketch = self.sketch
        gone = sketch.scores < self.threshold
        if displaced is not None:
            gone |= displaced.to(gone.device)[sketch.hot_rows.long().clamp_min(0)]
        gone = (gone & sketch.occupied & (sketch.hot_rows >= 0)).view(-1)
        rows = sketch.hot_rows.view(-1).long().to(self.weight.device)
        gone_here = gone.to(self.weight.device)
        if self.merge_on_demote:  # what the id learned while hot goes back into its first hashed row
            held = rows.clamp_min(0)
            first = self._shared_row(sketch.keys.view(-1).to(self.weight.device), 0)
            learned = (self.weight[held] - self.start[held]) * gone_here.unsqueeze(-1).to(self.weight.dtype)
            self.weight.index_add_(0, first, learned)
        # a padding row at the end takes the writes of slots that give nothing back
        owned = torch.cat([self.owned, self.owned.new_zeros(1)])
        owned.index_fill_(0, torch.where(gone_here, rows, self.owned.numel()), False)
        self.owned.copy_(owned[:-1])
        sketch.hot_rows.masked_fill_(gone.view_as(sketch.hot_rows), -1)

    def _promote_fixed(
        self, ids: Tensor, rows: Tensor, valid: Tensor, medium: Tensor | None, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """:meth:`_promote` where only ``valid`` pairs promote; ``rows`` are distinct, so every other pair writes
        its row's own values back."""
        device = self.weight.device
        on_device, valid = ids.to(device), valid.to(device)
        start = self.weight[self._shared_row(on_device, 0)]
        if medium is not None:
            start += self.weight[self._shared_row(on_device, 1)] * medium.to(device, start.dtype).unsqueeze(-1)
        column = valid.unsqueeze(-1)
        self.weight.index_copy_(0, rows, torch.where(column, start, self.weight[rows]))
        if self.merge_on_demote:
            self.start.index_copy_(0, rows, torch.where(column, start, self.start[rows]))
        self.sketch.set_hot_where(ids, rows.int(), valid)
        self.owner.index_copy_(0, rows, torch.where(valid, on_device, self.owner[rows]))
        self.owned.index_copy_(0, rows, self.owned[rows] | valid)
        reset_optimizer_rows(optimizer, self.weight, rows, where=valid)

    def _demote(self) -> None:
        """Hot ids whose score fell below the threshold give their rows back."""
        gone_ids, gone_rows = self.sketch.hot_below()
        if gone_ids.numel():
            self._release(gone_ids, gone_rows.to(self.weight.device, torch.long))

    def _release(self, ids: Tensor, rows: Tensor) -> None:
        """Hot ``ids`` give their ``rows`` back (what they learned folded into their hashed rows with
        ``merge_on_demote``)."""
        if ids.numel() == 0:
            return
        self.sketch.clear_hot(ids)
        if self.merge_on_demote:  # what the id learned while hot goes back into its first hashed row
            first = self._shared_row(ids.to(self.weight.device), 0)
            self.weight.index_add_(0, first, self.weight[rows] - self.start[rows])
        self.owned[rows] = False

    def _promote(
        self, ids: Tensor, rows: Tensor, medium: Tensor | None, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Give ``rows`` to ``ids`` (distinct, not hot), each starting as the vector the id was reading."""
        device = self.weight.device
        on_device = ids.to(device)
        start = self.weight[self._shared_row(on_device, 0)]
        if medium is not None:  # a medium id was reading its second row too
            second = self._shared_row(on_device, 1)
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
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> CAFETables:
        """On the device code path one flat sketch and one packed table for all of ``tables``
        (:mod:`compemb.embeddings.cafe.batch`); on a CPU with the compiled kernels each table's own lookup, their
        weights packed, so RowAdam updates them in one pass."""
        return CAFETables(tables)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", hot_rows={self.hot_rows}, hashed_rows={self.hashed_rows}"
        text += f", sketch_buckets={self.sketch.num_buckets}, threshold={self.threshold:g}"
        text += f", importance={self.importance!r}" if self.importance != "gradient" else ""
        text += f", hot_policy={self.hot_policy!r}" if self.hot_policy != "threshold" else ""
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
        hot_policy: ``"threshold"`` (default, the paper's: a free row goes to an id that reaches the threshold and
            stays with it until its score decays below) or ``"top"``: the rows go to the highest scores above the
            threshold; when none is free, a candidate scoring ``SWAP_GAIN`` (1.5) times the lowest owner's score
            takes that owner's row, and a newcomer to a sketch bucket takes its lowest slot without a hot id (the
            paper's drops it when that slot is hot).
        blocks: the sizes of the fields whose ids lie one after another in the vocabulary (the authors' layout
            across fields, see the module docstring); None: one field.
        field_tables: with ``blocks``, a hashed table per field (True, the authors') or one hashed table shared by
            every field (False; importance is still normalised per field, no field is kept full).

    Example::

        >>> emb = CAFEEmbedding(100_000, 16, compression=10, tuning="paper")  # hash_rate 0.5, threshold 20 at 10x
        >>> emb.hot_rows, emb.hashed_rows, emb.sketch.num_buckets * emb.sketch.slots, emb.memory().sketch_bytes
        (2269, (5000,), 9076, 154316)
        >>> emb(torch.tensor([5, 99_999])).shape
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
        hot_policy: str = "threshold",
        blocks: Sequence[int] | None = None,
        field_tables: bool = True,
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
            levels=1,
            compression=compression,
            num_params=num_params,
            hash_rate=hash_rate,
            threshold=threshold,
            tuning=tuning,
            importance=importance,
            decay=decay,
            sketch_slots_per_row=sketch_slots_per_row,
            merge_on_demote=merge_on_demote,
            hot_policy=hot_policy,
            blocks=blocks,
            field_tables=field_tables,
            seed=seed,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device=device,
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
        hot_policy: str = "threshold",
        blocks: Sequence[int] | None = None,
        field_tables: bool = True,
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
            levels=2,
            compression=compression,
            num_params=num_params,
            hash_rate=hash_rate,
            threshold=threshold,
            tuning=tuning,
            importance=importance,
            decay=decay,
            sketch_slots_per_row=sketch_slots_per_row,
            merge_on_demote=merge_on_demote,
            hot_policy=hot_policy,
            medium_fraction=medium_fraction,
            hash_split=hash_split,
            blocks=blocks,
            field_tables=field_tables,
            seed=seed,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
            device=device,
        )
