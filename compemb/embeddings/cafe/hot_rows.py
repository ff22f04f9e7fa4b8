"""How CAFE's hot rows change hands: the importance a batch recorded (normalised per field) goes into the HotSketch,
hot ids whose score decayed below the threshold give their rows back, and the best new candidates take the free
rows (with ``hot_policy="top"``, also the rows of owners they outscore by :data:`SWAP_GAIN`).

:class:`HotRowUpdates` is a mixin of the CAFE classes (:mod:`compemb.embeddings.cafe.embedding`, whose module
docstring states the rules).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from compemb.embeddings.adaptive import reset_optimizer_rows
from compemb.embeddings.cafe.kernels import hot_candidates

if TYPE_CHECKING:
    from compemb.embeddings.adaptive import AdaptiveEmbedding
    from compemb.sketch.hotsketch import HotSketch

    # the host class's base, for mypy alone (super() calls reach it; at run time the mixin's base is object)
    _Host = AdaptiveEmbedding
else:
    _Host = object

# with "top", a candidate displaces an owner only when it scores this many times the owner's score: two ids of
# near-equal score would otherwise trade a row back and forth, each trade restarting it from the shared row
SWAP_GAIN = 1.5


def hot_candidates_torch(ids: Tensor, scores: Tensor, hot: Tensor, threshold: float, limit: int) -> Tensor:
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


class HotRowUpdates(_Host):
    """What recorded importance changes in a CAFE table, after the optimizer step (the ``_update`` hook of
    :class:`~compemb.embeddings.adaptive.AdaptiveEmbedding`): its sketch, who owns each hot row (``owner``,
    ``owned``) and the rows that change owner (``weight``, ``start``). On the device code path in fixed shapes,
    nothing read back. The table provides its routing (``_fields``, ``_shared_row``) and sizes."""

    _mass_seen: float | None  # the sketch's decay mass after the last update (None: not known)

    if TYPE_CHECKING:  # what the CAFE table (the host class) provides
        sketch: HotSketch
        owner: Tensor
        owned: Tensor
        start: Tensor
        hot_rows: int
        levels: int
        threshold: float
        medium_fraction: float
        hot_policy: str
        merge_on_demote: bool
        blocks: list[int] | None
        field_starts: Tensor
        field_direct: Tensor
        _has_full_fields: bool

        def _fields(self, ids: Tensor) -> Tensor: ...

        def _shared_row(self, ids: Tensor, level: int, field: Tensor | None = None) -> Tensor: ...

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
                picked = hot_candidates_torch(ids, now, hot, self.threshold, limit)
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
