"""A per-feature collection's CAFE tables looked up and updated together, as one flat sketch and one packed table.

On a device each CAFE table's lookup and update is a few hundred small kernels; a per-feature collection of
Criteo's 26 features has a CAFE table for each large one, and their launches add up to most of a step.
:class:`CAFETables` does what each table would do, for all of them at once, on the device code path
(:func:`compemb.kernels.device_path`):

- the tables' sketches lie end to end in one set of buffers (:class:`~compemb.sketch.packed.PackedSketches`: flat
  buckets with per-table offsets), their weights in one buffer (:class:`~compemb.table_batch.PackedWeights`), their
  row owners in one more (:class:`~compemb.table_batch.PackedBuffers`); every table keeps its own buffers and
  parameters (``state_dict``, optimizers and export see no difference), only their storage is shared;
- a lookup queries every column in the flat sketch and reads every row in one gather;
- after the optimizer step (:meth:`CAFETables.apply_pending`, called by the Trainer and the TorchRec adapter)
  the recorded importance of every table goes into the flat sketch in one merge, hot ids below their table's
  threshold give their rows back in one pass over every bucket, and each table's best new candidates (one sort
  per column) take its free rows (one stable sort of every table's rows by (table, owned)) in one write.

It computes exactly what each table's own device path (``_CAFE._update_fixed``) computes (tested value for value),
except that hot ids are demoted in every table when any table's sketch decays (a table whose sketch did not decay
holds no hot id below its threshold: promotion needs the threshold and scores fall only by decay, so nothing
changes there). With the compiled CPU kernels (``kernels="auto"`` on a CPU), with ``merge_on_demote``, with
``hot_policy="top"`` (owners displaced by better candidates: not batched yet) or with tables that differ in levels,
importance or slots, each table looks itself up and updates itself
(:class:`~compemb.table_batch.SeparateLookups`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from compemb.embeddings.adaptive import gather_pending, reset_optimizer_rows, reset_packed_rows
from compemb.kernels import device_path
from compemb.sketch.packed import PackedSketches
from compemb.table_batch import IdRanges, PackedBuffers, SeparateLookups, hash_columns

_LARGEST = torch.iinfo(torch.int64).max


class CAFETables:
    """Per-feature CAFE tables (one class, one ``sparse``) as one table batch; see the module docstring.

    Args:
        tables: the tables, in column order.
    """

    def __init__(self, tables: Sequence[Any]) -> None:  # compemb.embeddings.cafe.embedding._CAFE tables
        self.tables = list(tables)
        first = self.tables[0]
        self.separate = SeparateLookups(self.tables, ["weight", "start"] if first.merge_on_demote else ["weight"])
        self.weights = self.separate.packs[0]
        self._sketches: PackedSketches | None = None
        self._owners: tuple[PackedBuffers, PackedBuffers] | None = None
        self._constants: tuple[tuple, dict[str, Tensor]] | None = None
        self.ranges = IdRanges(self.tables)

    # --- when the tables go together --------------------------------------------------------------------

    def together(self, ids: Tensor) -> bool:
        """Whether lookups and updates of ``ids`` go through the flat sketch (else each table does its own)."""
        first = self.tables[0]
        return (
            len(self.tables) > 1
            and device_path(ids)
            and all(
                table.sketch._merges
                and table.blocks is None
                and not table.merge_on_demote
                and table.hot_policy == "threshold"
                and not table._has_full_fields
                and table.levels == first.levels
                and table.importance == first.importance
                and table.sketch.slots == first.sketch.slots
                and table.sketch.keys.device == table.weight.device
                for table in self.tables
            )
        )

    def _packed(self) -> tuple[PackedSketches, Tensor, Tensor, Tensor, list[int]]:
        """The flat sketch, weights, owners and owned flags (one padding row each), and the weights' row
        offsets as host ints (packed again where anything moved)."""
        if self._sketches is None or any(
            a is not b for a, b in zip(self._sketches.sketches, (t.sketch for t in self.tables))
        ):
            self._sketches = PackedSketches([table.sketch for table in self.tables])
            self._owners = (
                PackedBuffers(self.tables, "owner", padding=1),
                PackedBuffers(self.tables, "owned", padding=1),
            )
        self._sketches.ensure_packed()
        owners, owned = self._owners  # type: ignore[misc]
        self.weights.ensure_packed()
        return self._sketches, self.weights.buffer, owners.flat(), owned.flat(), self.weights.starts

    def _constants_for(self, batch: int, device: torch.device) -> dict[str, Tensor]:
        """Index and threshold tensors for a batch of ``batch`` rows, made once per batch size and setting (from
        Python lists every step they would be a copy from the host in every step)."""
        tables = self.tables
        hot = [table.hot_rows for table in tables]
        key = (
            batch,
            device,
            tuple(t.threshold for t in tables),
            tuple(t.medium_fraction for t in tables),
            tuple(hot),
            tuple((t._offsets, t.hashed_rows) for t in tables),
            tuple(self.weights.starts),
        )
        if self._constants is not None and self._constants[0] == key:
            return self._constants[1]
        count = len(tables)
        limits = [min(batch, rows) for rows in hot]
        owned_starts = [sum(hot[:t]) for t in range(count)]
        # (rank, table) of every promotion slot, table after table: table t ranks min(batch, its hot rows)
        pair_table = [t for t in range(count) for _ in range(limits[t])]
        pair_rank = [r for t in range(count) for r in range(limits[t])]
        buckets = [table.sketch.num_buckets for table in tables]

        def tensor(values: list, dtype: torch.dtype = torch.int64) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        constants = {
            "threshold": tensor([t.threshold for t in tables], torch.float32).view(1, -1),
            "medium": tensor([t.medium_fraction * t.threshold for t in tables], torch.float32).view(1, -1),
            "pair_table": tensor(pair_table),
            "pair_rank": tensor(pair_rank),
            # where table t's rows sit in the stable sort of every row by (table, owned): its free rows first
            "pair_slot": tensor([owned_starts[t] + r for t, r in zip(pair_table, pair_rank)]),
            "pair_owned_start": tensor([owned_starts[t] for t in pair_table]),
            "pair_weight_start": tensor([self.weights.starts[t] for t in pair_table]),
            "row_table": tensor([t for t in range(count) for _ in range(hot[t])]),
            # per bucket of the flat sketch: its table's threshold, and where its table's rows start in `owned`
            "bucket_threshold": tensor(
                [t.threshold for t, n in zip(tables, buckets) for _ in range(n)], torch.float32
            ).view(-1, 1),
            "bucket_owned_start": tensor([s for s, n in zip(owned_starts, buckets) for _ in range(n)]).view(-1, 1),
        }
        for level in range(tables[0].levels):  # one field: level l's hashed rows start at _offsets[l]
            constants[f"rows{level}"] = tensor([t.hashed_rows[level] for t in tables]).view(-1, 1)
            constants[f"start{level}"] = tensor(
                [t._offsets[level] + start for t, start in zip(tables, self.weights.starts)]
            ).view(1, -1)
        self._constants = (key, constants)
        return constants

    def _shared_rows(self, ids: Tensor, level: int, constants: dict[str, Tensor]) -> Tensor:
        """The packed buffer's row each of ``ids`` ``(batch, tables)`` reads at ``level`` when not hot."""
        hashes = [table.hashes[level] for table in self.tables]
        return hash_columns(ids, hashes, constants[f"rows{level}"]).squeeze(-1) + constants[f"start{level}"]

    # --- lookups ------------------------------------------------------------------------------------------

    def __call__(self, ids: Tensor) -> Tensor:
        """``(batch, tables)`` int64 ids, column j for table j -> ``(batch, tables, embedding_dim)``."""
        if not self.together(ids):
            return self.separate(ids)
        self.ranges.check(ids)
        first = self.tables[0]
        if first.training:  # a plain loop never calls apply_pending: what the last backward recorded applies now
            self.apply_pending()
        sketches, _, _, _, _ = self._packed()
        constants = self._constants_for(ids.shape[0], ids.device)
        score, hot = sketches.query(ids)
        rows = torch.where(hot >= 0, hot.long() + self.weights.row_offsets, self._shared_rows(ids, 0, constants))
        if first.levels == 1:
            vectors = self.weights.gather(rows.unsqueeze(-1)).squeeze(2)
        else:  # a medium id reads the sum of its two rows
            both = self.weights.gather(torch.stack([rows, self._shared_rows(ids, 1, constants)], -1))
            medium = (hot < 0) & (score >= constants["medium"])
            vectors = both[:, :, 0] + both[:, :, 1] * medium.unsqueeze(-1).to(both.dtype)
        if first.training and vectors.requires_grad:
            vectors.register_hook(lambda grad: self._record(ids, grad))
        return vectors

    def _record(self, ids: Tensor, grad: Tensor | None) -> None:
        """Each table's occurrences and gradient norms, as its own lookup's hook records them."""
        if grad is None:
            return
        frequency = self.tables[0].importance == "frequency"
        norms = None if frequency else torch.linalg.vector_norm(grad.detach(), dim=-1)
        for column, table in enumerate(self.tables):
            table._pending.append((ids[:, column], None if norms is None else norms[:, column]))

    # --- updates ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply_pending(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every table's recorded importance applied at once (``optimizer``: rows given to new ids forget their
        state); tables that cannot go together are left to their own ``on_step_end``."""
        tables = self.tables
        if not all(table._pending for table in tables) or not self.together(tables[0]._pending[0][0]):
            return
        gather_pending(tables)  # under torchrun: every rank's occurrences (in one process: nothing)
        sizes = [[ids.shape[0] for ids, _ in table._pending] for table in tables]
        if any(size != sizes[0] for size in sizes):  # recorded apart (a table looked up alone): each on its own
            return
        id_parts, score_parts = [], []
        for part in range(len(sizes[0])):
            ids = torch.stack([table._pending[part][0] for table in tables], dim=1)
            if ids.numel() == 0:
                continue
            id_parts.append(ids)
            if tables[0].importance != "frequency":
                # each table's norms normalised to mean 1 over its column (no signal: 0), as _normalise does
                norms = torch.stack([table._pending[part][1] for table in tables]).float()  # (tables, batch)
                mean = norms.mean(1, keepdim=True)
                usable = torch.isfinite(mean) & (mean > 0)
                score_parts.append(torch.where(usable, norms / torch.where(usable, mean, 1.0), 0.0).t())
        for table in tables:
            table._pending, table._pending_gathered = [], False
        if id_parts:
            scores = torch.cat(score_parts) if score_parts else None
            self._update(torch.cat(id_parts), scores, optimizer)

    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        """``_CAFE._update_fixed`` of every table at once: ``ids`` and ``scores`` ``(batch, tables)``."""
        tables = self.tables
        sketches, weight, owner, owned, _ = self._packed()
        constants = self._constants_for(ids.shape[0], ids.device)
        ids = ids.to(weight.device)
        before = sketches.query(ids)[0] if tables[0].levels == 2 else None
        # scores only fall when they decay: demote when the host knows they did (or cannot know), as each table
        unknown = [
            t.sketch._known_mass is None or t._mass_seen is None or t.sketch._known_mass != t._mass_seen for t in tables
        ]
        decays = sketches.insert(ids, scores, masses=[float(ids.shape[0])] * len(tables))
        for table in tables:
            table._mass_seen = table.sketch._known_mass
        if any(unknown) or any(decays):
            self._demote(sketches, owned, constants)
        self._promote(ids, before, sketches, weight, owner, owned, constants, optimizer)

    def _demote(self, sketches: PackedSketches, owned: Tensor, constants: dict[str, Tensor]) -> None:
        """Hot ids scoring below their table's threshold give their rows back, in every bucket at once."""
        hot_rows, scores = sketches.buffers["hot_rows"], sketches.buffers["scores"]
        gone = sketches.buffers["occupied"] & (hot_rows >= 0) & (scores < constants["bucket_threshold"])
        rows = hot_rows.long() + constants["bucket_owned_start"]
        owned.index_fill_(0, torch.where(gone, rows, owned.numel() - 1).view(-1), False)  # the padding row
        hot_rows.masked_fill_(gone, -1)

    def _promote(
        self,
        ids: Tensor,
        before: Tensor | None,
        sketches: PackedSketches,
        weight: Tensor,
        owner: Tensor,
        owned: Tensor,
        constants: dict[str, Tensor],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        """Each table's best new candidates (its threshold reached, not hot; each id once, best first) take its
        free rows (lowest first), each starting as the vector the id was reading."""
        tables = self.tables
        now, hot = sketches.query(ids)
        eligible = (now >= constants["threshold"]) & (hot < 0)
        limit = min(ids.shape[0], max(table.hot_rows for table in tables))
        # per column: each eligible id once (in id order), then the best first
        sorted_ids, position = torch.sort(torch.where(eligible, ids, _LARGEST), dim=0, stable=True)
        first = eligible.gather(0, position)
        first[1:] &= sorted_ids[1:] != sorted_ids[:-1]
        ranked = torch.sort(torch.where(first, now.gather(0, position), -math.inf), dim=0, descending=True, stable=True)
        chosen = position.gather(0, ranked.indices[:limit])  # (limit, tables): batch rows of the candidates
        wanted = ranked.values[:limit] > -math.inf
        new_ids = ids.gather(0, chosen)
        pair_rank, pair_table = constants["pair_rank"], constants["pair_table"]
        pair_ids, pair_wanted = new_ids[pair_rank, pair_table], wanted[pair_rank, pair_table]
        # every table's rows sorted by (table, owned), stably: each table's free rows first, ascending
        rows_by_table = constants["row_table"] * 2 + owned[:-1].to(torch.int64)
        free = torch.sort(rows_by_table, stable=True).indices[constants["pair_slot"]]  # index into `owned`
        valid = pair_wanted & ~owned[free]
        local = free - constants["pair_owned_start"]  # the row in its table (hot rows come first)
        rows = local + constants["pair_weight_start"]  # the row in the packed weights
        start = weight[self._shared_rows(new_ids, 0, constants)[pair_rank, pair_table]]
        if before is not None:  # a medium id was reading its second row too
            medium = before.gather(0, chosen) >= constants["medium"]
            second = self._shared_rows(new_ids, 1, constants)[pair_rank, pair_table]
            start += weight[second] * medium[pair_rank, pair_table].to(start.dtype).unsqueeze(-1)
        column = valid.unsqueeze(-1)
        weight.index_copy_(0, rows, torch.where(column, start, weight[rows]))
        at = sketches.locate(new_ids)[pair_rank, pair_table]
        set_hot = valid & (at >= 0)
        flat_hot = sketches.buffers["hot_rows"].view(-1)
        # adding 0 where nothing is set leaves any slot as it was
        step = torch.where(set_hot, local.to(torch.int32) - flat_hot[at.clamp_min(0)], 0)
        flat_hot.index_put_((at.clamp_min(0),), step.to(torch.int32), accumulate=True)
        owner.index_copy_(0, free, torch.where(valid, pair_ids, owner[free]))
        owned.index_copy_(0, free, owned[free] | valid)
        # the optimizer's state of the promoted rows: over the tables' packed state at once where it is packed,
        # else each table's own (its pairs are one contiguous slice)
        if optimizer is not None and not reset_packed_rows(optimizer, [t.weight for t in tables], rows, where=valid):
            offset = 0
            for table in tables:
                size = min(ids.shape[0], table.hot_rows)
                reset_optimizer_rows(
                    optimizer, table.weight, local[offset : offset + size], where=valid[offset : offset + size]
                )
                offset += size
