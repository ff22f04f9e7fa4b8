"""Hot rows for important ids, hashed rows for the rest: CAFE, CAFE-ML, and the two baselines CAFE compares with.

- ``cafe``: "CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models", Zhang et
  al., SIGMOD 2024 (arXiv 2312.03256). A HotSketch scores ids during training; an id whose score reaches the
  threshold gets a row of its own in a hot table while one is free, the rest share a hashed table.
- ``cafe-ml``: CAFE's multi-level hash embedding: medium ids (score >= 0.2 x threshold) read the sum of one row
  from each of two hashed tables, cold ids one row.
- ``offline``: CAFE's "OFF" baseline: the ids most frequent in the training split, counted before training,
  own rows; the rest are hashed.
- ``adaembed``: "AdaEmbed: Adaptive Embedding for Large-Scale Recommendation Models", Lai et al., OSDI 2023:
  a fixed number of rows, reallocated every few steps to the ids of highest importance.

Choices where the papers leave room (each class's docstring says more):

- Importance is recorded by a hook the module puts on its own output: an occurrence scores the L2 norm of its
  output gradient, normalised to mean 1 over the batch (or 1, with ``importance="frequency"``). The hook only
  records; the updates (sketch inserts, promotions, demotions, reallocation) run in ``on_step_end(step,
  optimizer)``, which the Trainer calls after ``optimizer.step()``, or else at the start of the next forward, so
  a plain loop needs no change. ``state_dict()`` applies what is pending first, so a checkpoint loses nothing.
- Thresholds are in compemb's units: an occurrence at its batch's mean gradient norm scores 1, so ``threshold``
  is "this many average occurrences of evidence". The sketch decays once per ``10 x threshold x buckets`` of
  inserted score, so an id with a share p of the score settles near ``1000 p x threshold x buckets`` and stays hot
  while p >= ~1 / (1000 buckets), whatever the threshold: the threshold only sets how much evidence an id gathers
  before it takes a free row (lower: rows fill sooner, from noisier ranks). Measured in these units
  (``benchmarks/results/cafe_tuning.md``), the paper's table (:data:`PAPER_DEFAULTS`, raw gradient norms there)
  was as good as anything tried while the budget buys 1,000 rows or more; below that a high hash_rate and a low
  threshold win. ``tuning="compemb"`` (the default) follows that rule; ``tuning="paper"`` is the table alone.
- Hot, hashed and fallback rows are one stored table (hot rows first): one gather per lookup, one gradient.
- The HotSketch holds ``sketch_slots_per_row`` = 4 slots per hot row (H buckets of 4 slots), room for the hot ids
  and three candidates per hot row; its bytes count in the budget as sketch bytes.
- A row that changes owner has its optimizer state reset (:func:`~compemb.embeddings.adaptive.reset_optimizer_rows`)
  when ``on_step_end`` is given the optimizer; updates applied at the next forward have no optimizer to reset.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import (
    FLOAT_BYTES,
    Budget,
    MemoryReport,
    every_budget_from,
    full_table_bytes,
    resolve_budget,
    rows_for,
)
from compemb.embeddings.adaptive import reset_optimizer_rows
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.hashing import UniversalHash, coefficient_bytes, hash_ids
from compemb.registry import register
from compemb.sketch.hotsketch import SLOT_BYTES, HotSketch

IMPORTANCE = ("gradient", "frequency")
# (ratio, hash_rate, threshold); a ratio takes the largest entry <= it.
# The CAFE paper's Criteo tuning: its thresholds are in its own units (raw gradient norms), not compemb's.
PAPER_DEFAULTS = ((2, 0.7, 10), (5, 0.5, 10), (10, 0.5, 20), (20, 0.5, 30), (50, 0.3, 50), (100, 0.3, 100),
                  (200, 0.2, 200), (500, 0.2, 500), (1000, 0.2, 500), (2000, 0.1, 500))
# compemb's tuning (benchmarks/results/cafe_tuning.md): what the measurements turn on is the number of rows a budget
# buys, not the ratio. Below SMALL_BUDGET_ROWS rows of d floats, hashed rows are worth more than hot rows (a high
# hash_rate) and the paper's large thresholds cost; from there on nothing measured beat the paper's table.
SMALL_BUDGET_ROWS = 1000
SMALL_BUDGET_SETTINGS = (0.9, 3.0)  # (hash_rate, threshold)
TUNINGS = ("compemb", "paper")
SKETCH_SLOTS = 4  # slots per HotSketch bucket, as in the paper
OWNER_BYTES = 8 + 1  # per hot row: its owner id (int64) and whether it has one (bool)
NO_ID = torch.iinfo(torch.int64).max  # AdaEmbed's free map entries: sorts after every id in [0, n)


# --- compiled CPU routing: one pass from ids to table rows (torch ops elsewhere give the same rows) ---------


@numba.njit(inline="always")
def _bucket(mixed: int, num_buckets: int) -> int:
    # compemb.hashing's multiply-high of the top 32 bits of a * x + b: identical to hash_ids
    return ((mixed >> 32) & 0xFFFFFFFF) * num_buckets >> 32


@numba.njit(cache=True, nogil=True)
def _cafe_rows_kernel(ids, keys, scores, hot_rows, occupied, sketch_coefficients, coefficients, hashed, offsets,
                      medium, out_rows, out_weights):
    """Row(s) of each id: its hot row, else its hashed row; two levels add the second row, weighted 1 if medium."""
    num_buckets, num_slots = keys.shape
    sa, sb = sketch_coefficients[0, 0], sketch_coefficients[0, 1]
    levels = out_rows.shape[1]
    for i in range(ids.shape[0]):
        x = np.int64(ids[i])
        bucket = _bucket(sa * x + sb, num_buckets)
        score = np.float32(0.0)
        row = -1
        for j in range(num_slots):
            if occupied[bucket, j] and keys[bucket, j] == x:
                score = scores[bucket, j]
                row = hot_rows[bucket, j]
                break
        if row < 0:
            row = offsets[0] + _bucket(coefficients[0, 0] * x + coefficients[0, 1], hashed[0])
        out_rows[i, 0] = row
        if levels == 2:
            out_rows[i, 1] = offsets[1] + _bucket(coefficients[1, 0] * x + coefficients[1, 1], hashed[1])
            out_weights[i, 0] = 1.0
            out_weights[i, 1] = 1.0 if row >= offsets[0] and score >= medium else 0.0  # hot rows come first


@numba.njit(cache=True, nogil=True)
def _search_rows_kernel(ids, sorted_ids, sorted_rows, a, b, num_buckets, offset, out):
    """An id found among ``sorted_ids`` reads its row (``sorted_rows``, or its position if empty), else a hashed one."""
    n, m = sorted_ids.shape[0], ids.shape[0]
    positional = sorted_rows.shape[0] == 0
    group = 16
    low = np.zeros(group, dtype=np.int64)
    for start in range(0, m, group):
        size = min(group, m - start)
        low[:size] = 0
        length = n
        # binary searches of 16 ids in step: each is a chain of dependent loads, and 16 chains overlap (3x faster
        # on a fresh batch than one search after the other, which waits on every load)
        while length > 1:
            half = length >> 1
            for j in range(size):
                low[j] += half * np.int64(sorted_ids[low[j] + half - 1] < ids[start + j])
            length -= half
        for j in range(size):
            x = np.int64(ids[start + j])
            at = low[j] + (1 if n > 0 and sorted_ids[low[j]] < x else 0)  # the first position >= x
            if at < n and sorted_ids[at] == x:
                out[start + j] = at if positional else sorted_rows[at]
            else:
                out[start + j] = offset + _bucket(a * x + b, num_buckets)


@numba.njit(cache=True, nogil=True)
def _candidates_kernel(ids, scores, hot, threshold, limit):
    """Positions of up to ``limit`` distinct ids scoring >= threshold without a hot row: highest score first,
    ties to the smaller id (one position per id; its occurrences share their scores)."""
    chosen = np.empty(0, dtype=np.int64)
    count = 0
    for i in range(ids.shape[0]):
        if scores[i] >= threshold and hot[i] < 0:
            count += 1
    if count == 0 or limit == 0:
        return chosen
    positions = np.empty(count, dtype=np.int64)
    count = 0
    for i in range(ids.shape[0]):
        if scores[i] >= threshold and hot[i] < 0:
            positions[count] = i
            count += 1
    positions = positions[np.argsort(ids[positions], kind="mergesort")]
    distinct = np.empty(count, dtype=np.int64)
    kept = 0
    for k in range(count):
        if kept == 0 or ids[positions[k]] != ids[distinct[kept - 1]]:
            distinct[kept] = positions[k]
            kept += 1
    distinct = distinct[:kept]
    order = np.argsort(-scores[distinct], kind="mergesort")  # stable: equal scores stay in id order
    return distinct[order[:limit]]


_NO_ROWS = np.empty(0, dtype=np.int32)
_NO_WEIGHTS = np.empty((0, 2), dtype=np.float32)


def search_rows(ids: Tensor, sorted_ids: Tensor, sorted_rows: Tensor | None, hash_module: UniversalHash,
                offset: int) -> Tensor:
    """Rows of ``ids``: found in ``sorted_ids`` -> ``sorted_rows`` (or the position), else ``offset + hash(id)``."""
    if ids.is_cpu and not sorted_ids.is_meta:
        out = torch.empty(ids.shape, dtype=torch.int64)
        a, b = (int(v) for v in hash_module.coefficients[0].tolist())
        _search_rows_kernel(ids.numpy(), sorted_ids.numpy(), _NO_ROWS if sorted_rows is None else sorted_rows.numpy(),
                            a, b, hash_module.num_buckets, offset, out.numpy())
        return out
    return _search_rows_torch(ids, sorted_ids, sorted_rows, hash_module, offset)


def _search_rows_torch(ids: Tensor, sorted_ids: Tensor, sorted_rows: Tensor | None, hash_module: UniversalHash,
                       offset: int) -> Tensor:
    """:func:`search_rows` in torch ops, for any device."""
    position = torch.searchsorted(sorted_ids, ids).clamp_max_(sorted_ids.numel() - 1)
    found = sorted_ids[position] == ids
    row = position if sorted_rows is None else sorted_rows[position].long()
    return torch.where(found, row, hash_module(ids).squeeze(-1) + offset)


def _join(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def default_settings(ratio: float | None, tuning: str = "compemb", rows: float | None = None) -> tuple[float, float]:
    """``(hash_rate, threshold)`` for a budget of compression ``ratio`` that buys ``rows`` rows of d floats.

    ``"paper"``: the entry of :data:`PAPER_DEFAULTS` with the largest ratio <= ``ratio`` (its first entry below
    it; 10x for None). ``"compemb"``: :data:`SMALL_BUDGET_SETTINGS` when ``rows`` < :data:`SMALL_BUDGET_ROWS`,
    else the paper's entry.

    Example::

        >>> default_settings(100, "paper"), default_settings(150, "paper"), default_settings(1.5, "paper")
        ((0.3, 100.0), (0.3, 100.0), (0.7, 10.0))
        >>> default_settings(10_000, "compemb", rows=338), default_settings(10_000, "compemb", rows=3_376)
        ((0.9, 3.0), (0.1, 500.0))
    """
    if tuning not in TUNINGS:
        raise ValueError(f"tuning must be one of {TUNINGS}, got {tuning!r}")
    if tuning == "compemb" and rows is not None and rows < SMALL_BUDGET_ROWS:
        return SMALL_BUDGET_SETTINGS
    if ratio is None:  # an open vocabulary given num_params has no ratio: the middle of the table
        ratio = 10
    chosen = PAPER_DEFAULTS[0]
    for entry in PAPER_DEFAULTS:
        # a budget is a whole number of bytes, so an asked 1000x computes as 999.99x: within 1% counts as reached
        if entry[0] <= ratio * 1.01:
            chosen = entry
    return chosen[1], float(chosen[2])


def paper_defaults(ratio: float | None) -> tuple[float, float]:
    """``(hash_rate, threshold)`` the CAFE paper tuned for ``ratio``: ``default_settings(ratio, "paper")``.

        >>> paper_defaults(5000)
        (0.1, 500.0)
    """
    return default_settings(ratio, "paper")


def _ratio(budget: Budget, num_embeddings: int | None, embedding_dim: int) -> float | None:
    return None if num_embeddings is None else full_table_bytes(num_embeddings, embedding_dim) / budget.num_bytes


def _report(module: torch.nn.Module, sketch: tuple[str, ...] = (), floats: tuple[str, ...] = ()) -> MemoryReport:
    """Every parameter and buffer once: parameters (and ``floats`` buffers) as floats, ``sketch`` prefixes as sketch."""
    counts = {"float": 0, "index": 0, "sketch": 0}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        kind = "float" if isinstance(tensor, torch.nn.Parameter) or name in floats else "index"
        kind = "sketch" if name.startswith(sketch) and sketch else kind
        counts[kind] += tensor.numel() * tensor.element_size()
    return MemoryReport(float_bytes=counts["float"], index_bytes=counts["index"], sketch_bytes=counts["sketch"])


class _Adaptive(CompressedEmbedding):
    """Records per-occurrence importance from a hook on the lookup's output; applies it after the optimizer step."""

    weight: torch.nn.Parameter

    def _start_recording(self, importance: str) -> None:
        if importance not in IMPORTANCE:
            raise ValueError(f"{self.method_name}: importance must be one of {IMPORTANCE}, got {importance!r}")
        self.importance = importance
        self._pending: list[tuple[Tensor, Tensor | None]] = []

    def _vectors(self, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        raise NotImplementedError

    def lookup(self, ids: Tensor) -> Tensor:
        self._flush()  # a plain loop never calls on_step_end: what the last backward recorded applies now
        vectors = self._vectors(ids)
        if self.training and vectors.requires_grad:
            vectors.register_hook(lambda grad: self._record(ids, grad))
        return vectors

    def _record(self, ids: Tensor, grad: Tensor | None) -> None:
        # only remember (one kernel: the norms): tables must not change during backward, nor before the step
        if grad is None or ids.numel() == 0:  # None: autograd passes an undefined gradient
            return
        norms = None if self.importance == "frequency" else torch.linalg.vector_norm(grad.detach(), dim=-1)
        self._pending.append((ids, norms))

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply the importance recorded since the last call; ``optimizer`` lets moved rows forget their state."""
        self._flush(optimizer)

    @torch.no_grad()
    def _flush(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        id_parts, score_parts = [], []
        for ids, norms in pending:
            if norms is not None:  # each backward's norms, normalised to mean 1
                mean = float(norms.mean())
                if not (math.isfinite(mean) and mean > 0):  # no gradient, or a diverged one: no signal
                    continue
                score_parts.append(norms.float() / mean)
            id_parts.append(ids)
        if id_parts:
            scores = None if self.importance == "frequency" else _join(score_parts)
            self._update(_join(id_parts), scores, optimizer)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._flush()  # what the next forward would apply: a checkpoint taken now must hold it
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self._pending = []  # recorded against the state being replaced
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _CAFE(_Adaptive):
    """The CAFE family: ``H`` hot rows owned through a HotSketch, then one or two hashed tables."""

    open_vocabulary = True

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
        ratio = _ratio(budget, self.num_embeddings, self.embedding_dim)
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
                                device="meta" if torch.device(device or "cpu").type == "meta" else None)
        total_rows = self.hot_rows + sum(self.hashed_rows)
        self._offsets = (self.hot_rows, self.hot_rows + self.hashed_rows[0])  # where each hashed table starts
        self.weight = torch.nn.Parameter(torch.empty(total_rows, d, device=device))
        self.register_buffer("owner", torch.empty(self.hot_rows, dtype=torch.int64, device=device))
        self.register_buffer("owned", torch.empty(self.hot_rows, dtype=torch.bool, device=device))
        if self.merge_on_demote:
            self.register_buffer("start", torch.empty(self.hot_rows, d, device=device))
        self._mirror: tuple[Tensor, ...] | None = None
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
        self._pending, self._mirror, self._mass_seen = [], None, None

    def memory(self) -> MemoryReport:
        """Hot and hashed rows (and start values) as floats, owners and hashes as index bytes, the sketch apart."""
        return _report(self, sketch=("sketch.",), floats=("start",))

    # --- routing -----------------------------------------------------------------------------------------

    def _route(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows ``(N, levels)`` of each id, and with two levels their weights ``(N, 2)``: 1, and 1 if medium."""
        if not ids.is_cpu:
            return self._route_torch(ids)
        # on CPU one compiled pass over the sketch and the hashes (5x faster than the torch ops)
        rows = torch.empty(ids.numel(), self.levels, dtype=torch.int64)
        weights = torch.empty(ids.numel(), 2) if self.levels == 2 else None
        keys, scores, hot, occupied, _, sketch_coefficients = self.sketch._arrays()
        _cafe_rows_kernel(ids.numpy(), keys, scores, hot, occupied, sketch_coefficients,
                          np.concatenate([h.coefficients.numpy() for h in self.hashes]),
                          np.array(self.hashed_rows, dtype=np.int64), np.array(self._offsets, dtype=np.int64),
                          self.medium_fraction * self.threshold, rows.numpy(),
                          _NO_WEIGHTS if weights is None else weights.numpy())
        return rows, weights

    def _route_torch(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`_route` in torch ops on a copy of the sketch on the ids' device (a GPU needs no trip to the CPU)."""
        if self._mirror is None or self._mirror[0].device != ids.device:
            sketch = self.sketch
            self._mirror = tuple(t.to(ids.device) for t in (sketch.keys, sketch.scores, sketch.hot_rows,
                                                            sketch.occupied, sketch.coefficients))
        keys, scores, hot_rows, occupied, coefficients = self._mirror
        bucket = hash_ids(ids, coefficients, self.sketch.num_buckets).squeeze(-1)
        match = (keys[bucket] == ids.unsqueeze(-1)) & occupied[bucket]
        score = torch.where(match, scores[bucket], 0).amax(-1)
        hot = torch.where(match, hot_rows[bucket].long(), -1).amax(-1)
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
        ids, scores = ids.cpu(), None if scores is None else scores.cpu()
        # the level each id was read at (cafe-ml): where a row it gets now starts
        before = sketch.query(ids)[0] if self.levels == 2 else None
        mass = float(sketch.mass)
        # scores only fall when they decay: during this insert (the mass it adds is used up), or since the last
        # update (decay() or a load restarts the mass)
        decayed = mass != self._mass_seen
        sketch.insert(ids, scores)
        self._mirror = None
        inserted = ids.numel() if scores is None else float(scores.sum())
        self._mass_seen = float(sketch.mass)
        if decayed or self._mass_seen < mass + inserted - sketch.decay_period / 2:
            self._demote()
        free = (~self.owned).nonzero().squeeze(-1)
        if free.numel():  # promotions: the best candidates of this batch take the free rows
            now, hot = sketch.query(ids)
            picked = torch.from_numpy(_candidates_kernel(ids.numpy(), now.numpy(), hot.numpy(), self.threshold,
                                                         free.numel()))
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
        self.sketch.set_hot(ids, rows.cpu().int())
        self.owner[rows] = on_device
        self.owned[rows] = True
        reset_optimizer_rows(optimizer, self.weight, rows)

    def hot_ids(self) -> tuple[Tensor, Tensor]:
        """The ids that own hot rows and their rows (int64, on the module's device), in row order."""
        rows = self.owned.nonzero().squeeze(-1)
        return self.owner[rows], rows

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._mirror, self._mass_seen = None, None

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
    the start of the next forward, with no optimizer to reset. On CUDA the sketch stays on the CPU (ids and
    scores are copied there once per step) and lookups read a device copy of it.

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


@register("offline")
class OfflineFrequencyEmbedding(CompressedEmbedding):
    """CAFE's "OFF" baseline: the ids most frequent in the training split own rows; the rest are hashed.

    The hot set is fixed before training from ``frequencies`` (per-id counts; the Trainer counts the train split,
    ``EmbeddingCollection(frequencies=...)`` passes each feature its own): the ``H`` largest counts, ties to the
    smaller id; ids never counted get no row (what rows they would take goes to the hashed table). The id -> row
    map is stored as whichever is smaller, both counted as index bytes: the sorted hot ids (int64, ``8H`` bytes;
    a lookup is a binary search) or a dense int32 row per counted id (``4 x len``).

    Args:
        frequencies: 1-D counts of ids ``0 .. len - 1`` (required; ids past it count 0 and are hashed).
        hash_rate: the share of the budget for hashed rows (default: CAFE's for the ratio).

    Example::

        >>> counts = torch.tensor([5, 0, 9, 1] * 250)
        >>> emb = OfflineFrequencyEmbedding(1000, 8, compression=4, frequencies=counts)
        >>> emb.hot_rows, emb.hot_ids[:3].tolist()
        (60, [2, 6, 10])
    """

    open_vocabulary = True
    needs_frequencies = True
    title = "offline: top-frequency own rows"
    formula = "H * d + rows * d + id map"

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        frequencies: Tensor | None = None,
        hash_rate: float | None = None,
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, mode=mode, sparse=sparse, name=name, init=init)
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        if frequencies is None:
            raise ValueError(
                f"{self._who()} needs frequencies=: per-id counts of the training split (the Trainer and "
                "EmbeddingCollection(frequencies={name: counts}) pass them)"
            )
        counts = torch.as_tensor(frequencies)
        if counts.dim() != 1 or counts.numel() == 0 or counts.is_complex() or counts.dtype == torch.bool:
            raise ValueError(
                f"{self._who()}: frequencies must be 1-D real counts, got {counts.dtype} {tuple(counts.shape)}"
            )
        if num_embeddings is not None and counts.numel() != num_embeddings:
            raise ValueError(f"{self._who()}: frequencies has {counts.numel()} counts for {num_embeddings} ids")
        if not counts.is_meta and bool((counts < 0).any()):
            raise ValueError(f"{self._who()}: frequencies must be >= 0")
        d, counted = self.embedding_dim, counts.numel()
        self.hash_rate = paper_defaults(_ratio(budget, self.num_embeddings, d))[0] if hash_rate is None else hash_rate
        if not 0 < self.hash_rate < 1:
            raise ValueError(f"{self._who()}: hash_rate must be in (0, 1), got {hash_rate!r}")
        hash_bytes = coefficient_bytes(1)
        hot_bytes = (1 - self.hash_rate) * budget.num_bytes
        # ids never counted get no row (their rows go to the hashed table); meta counts plan for every id
        wanted = counted if counts.is_meta else max(1, int((counts > 0).sum()))
        by_search = max(1, min(wanted, int(hot_bytes // (d * FLOAT_BYTES + 8))))
        by_map = max(1, min(wanted, int((hot_bytes - 4 * counted) // (d * FLOAT_BYTES))))
        # the map that leaves more rows is the smaller one (for as many rows, the one of fewer bytes)
        self.dense_map = by_map > by_search or (by_map == by_search and 4 * counted < 8 * by_search)
        self.hot_rows = by_map if self.dense_map else by_search
        map_bytes = 4 * counted if self.dense_map else 8 * self.hot_rows
        reserved = self.hot_rows * d * FLOAT_BYTES + map_bytes + hash_bytes
        self.hashed_rows = rows_for(budget, d, reserved)
        self.hash = UniversalHash(self.hashed_rows, seed=seed, device=device)
        self.weight = torch.nn.Parameter(torch.empty(self.hot_rows + self.hashed_rows, d, device=device))
        if self.dense_map:
            self.register_buffer("row_of_id", torch.empty(counted, dtype=torch.int32, device=device))
        else:
            self.register_buffer("hot_ids", torch.empty(self.hot_rows, dtype=torch.int64, device=device))
        # the hot set, by rank, kept to rebuild the map in reset_parameters (None: planned from meta counts)
        self._by_rank = None if counts.is_meta else torch.sort(counts.cpu(), descending=True, stable=True).indices[
            : self.hot_rows]
        smallest = 2 * d * FLOAT_BYTES + 8 + hash_bytes
        self._finish(budget, seed, math.ceil(smallest / FLOAT_BYTES), every_budget_from(d, reserved))

    def reset_tables(self) -> None:
        init_uniform_(self.weight, self.init_bound, self._generator())
        target = self.row_of_id if self.dense_map else self.hot_ids
        if target.is_meta:
            return
        if self._by_rank is None:
            raise ValueError(f"{self._who()} was planned from meta frequencies: build it again with real counts")
        if self.dense_map:  # row = rank
            self.row_of_id.fill_(-1)
            self.row_of_id[self._by_rank.to(target.device)] = torch.arange(self.hot_rows, dtype=torch.int32,
                                                                          device=target.device)
        else:  # row = position among the sorted hot ids
            self.hot_ids.copy_(torch.sort(self._by_rank).values)

    def _rows(self, ids: Tensor) -> Tensor:
        if not self.dense_map:  # row = position among the sorted hot ids
            return search_rows(ids, self.hot_ids, None, self.hash, self.hot_rows)
        inside = (ids >= 0) & (ids < self.row_of_id.numel())
        row = self.row_of_id[ids.clamp(0, self.row_of_id.numel() - 1)].long()
        hot = inside & (row >= 0)
        return torch.where(hot, row, self.hash(ids).squeeze(-1) + self.hot_rows)

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(self._rows(ids), self.weight, sparse=self.sparse)

    def lookup_bags(
        self, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, one_id_per_bag: bool = False
    ) -> Tensor:
        return F.embedding_bag(self._rows(ids), self.weight, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights, sparse=self.sparse)

    def extra_repr(self) -> str:
        kind = "dense" if self.dense_map else "sorted"
        return super().extra_repr() + f", hot_rows={self.hot_rows}, hashed_rows={self.hashed_rows}, map={kind!r}"


@register("adaembed")
class AdaEmbed(_Adaptive):
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
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, mode=mode, sparse=sparse, name=name, init=init)
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

    def memory(self) -> MemoryReport:
        """Rows as floats, the map and hash as index bytes, the per-id scores (and their scale) as sketch bytes."""
        return _report(self, sketch=("scores", "scale"))

    def _vectors(self, ids: Tensor) -> Tensor:
        rows = search_rows(ids, self.sorted_ids, self.sorted_rows, self.hash, self.rows)
        return F.embedding(rows, self.weight, sparse=self.sparse)

    @torch.no_grad()
    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        self.steps += 1
        self.scale /= self.decay  # decaying every score = scaling every new one up
        added = torch.ones(ids.shape, dtype=torch.float64, device=ids.device) if scores is None else scores.double()
        self.scores.index_add_(0, ids.to(self.scores.device), (added * self.scale).to(self.scores.dtype))
        if float(self.scale) > 1e30:  # renormalise long before float32 overflows
            self.scores.mul_(float(1 / self.scale))
            self.scale.fill_(1)
        if int(self.steps) % self.interval == 0:
            self.reallocate(optimizer)

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
        new_rows, spare = free[: newcomers.numel()], free[newcomers.numel():]
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
        return text + f", interval={self.interval}" + (f", importance={self.importance!r}"
                                                        if self.importance != "gradient" else "")
