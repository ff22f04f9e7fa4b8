"""CAFE's "OFF" baseline: the ids most frequent in the training split, counted before training, own rows.

From "CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models", Zhang et al.,
SIGMOD 2024 (arXiv 2312.03256), which compares with it. Here the frequencies are counted on the training split
only (what a model may see before it trains).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, every_budget_from, resolve_budget, rows_for
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.embeddings.cafe.settings import budget_ratio, paper_defaults
from compemb.embeddings.id_map import search_rows
from compemb.hashing import UniversalHash, coefficient_bytes
from compemb.kernels import device_path
from compemb.registry import register
from compemb.table_batch import PackedBuffers, RowsBatch, column_sizes, hash_columns


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

    # the id -> row map, a buffer registered in __init__: row_of_id with dense_map, else hot_ids
    row_of_id: Tensor
    hot_ids: Tensor

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
        self.hash_rate = (
            paper_defaults(budget_ratio(budget, self.num_embeddings, d))[0] if hash_rate is None else hash_rate
        )
        if not 0 < self.hash_rate < 1:
            raise ValueError(f"{self._who()}: hash_rate must be in (0, 1), got {hash_rate!r}")
        hash_bytes = coefficient_bytes(1)
        hot_bytes = (1 - self.hash_rate) * budget.num_bytes
        # ids never counted get no row (their rows go to the hashed table); meta counts plan for every id
        wanted = counted if counts.is_meta else max(1, int((counts > 0).sum()))
        self.counted_ids = (counted, wanted)  # all the sizes depend on: an exported model is rebuilt from it
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
        self._by_rank = (
            None if counts.is_meta else torch.sort(counts.cpu(), descending=True, stable=True).indices[: self.hot_rows]
        )
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
            self.row_of_id[self._by_rank.to(target.device)] = torch.arange(
                self.hot_rows, dtype=torch.int32, device=target.device
            )
        else:  # row = position among the sorted hot ids
            self.hot_ids.copy_(torch.sort(self._by_rank).values)

    @classmethod
    def table_batch(cls, tables: Sequence[CompressedEmbedding]) -> _OfflineTablesBatch | None:
        """Offline tables side by side: every table's rows found together, one gather and one packed update."""
        return _OfflineTablesBatch(tables) if RowsBatch.accepts(tables) else None

    @classmethod
    def table_batch_with_full(cls, tables: Sequence[CompressedEmbedding]) -> _OfflineTablesBatch | None:
        """The offline tables and the full ones beside them (the small features of a per-feature collection)."""
        return cls.table_batch(tables)

    def rows_of(self, ids: Tensor) -> Tensor:
        """The row of ``weight`` each id reads: its own (a hot id) or ``hot_rows + hash(id)``."""
        return self._rows(ids)

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
        return F.embedding_bag(
            self._rows(ids),
            self.weight,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            sparse=self.sparse,
        )

    def extra_repr(self) -> str:
        kind = "dense" if self.dense_map else "sorted"
        return super().extra_repr() + f", hot_rows={self.hot_rows}, hashed_rows={self.hashed_rows}, map={kind!r}"


def _sizes(tables: list[OfflineFrequencyEmbedding]) -> list[int]:
    """The tables' ``num_embeddings``: a table batch's are all given (:meth:`RowsBatch.accepts`)."""
    return [cast(int, t.num_embeddings) for t in tables]


class _OfflineTablesBatch:
    """Offline tables (and full tables beside them, whose row is the id) as one table batch. On the host each
    table finds its rows by its own compiled search (:class:`~compemb.table_batch.RowsBatch`); on the device code
    path every offline column at once: one search of every sorted table's hot ids (table t's shifted by the sizes
    of those before it, so the concatenation is one ascending array), one gather from every dense table's map
    (packed end to end), one hash of every column, then one gather over the packed weights: each table's own rows,
    exactly."""

    def __init__(self, tables: Sequence[CompressedEmbedding]) -> None:
        self.tables = list(tables)
        self.rows_batch = RowsBatch(self.tables)  # the host path, the packed weights and the range rule
        offline = [j for j, t in enumerate(self.tables) if isinstance(t, OfflineFrequencyEmbedding)]
        self.offline = [
            t for t in self.tables if isinstance(t, OfflineFrequencyEmbedding)
        ]  # (those of columns offline)
        self.offline_columns = offline
        self.sorted = [k for k, t in enumerate(self.offline) if not t.dense_map]  # positions among the offline ones
        self.dense = [k for k, t in enumerate(self.offline) if t.dense_map]
        self.maps = PackedBuffers([self.offline[k] for k in self.dense], "row_of_id") if self.dense else None
        self._constants: dict[str, Tensor] | None = None
        self._hot: tuple[tuple[tuple[int, int], ...], Tensor] | None = None  # (the hot ids' versions, all of them)

    def _constants_on(self, device: torch.device) -> dict[str, Tensor]:
        if self._constants is None or self._constants["offline"].device != device:
            offline, chosen = self.offline, [self.offline[k] for k in self.sorted]
            dense = [self.offline[k] for k in self.dense]

            def tensor(values: list[int]) -> Tensor:
                return torch.tensor(values, dtype=torch.int64, device=device)

            self._constants = {
                "offline": tensor(self.offline_columns),
                "sorted": tensor(self.sorted),
                "dense": tensor(self.dense),
                "hashed_rows": column_sizes([t.hash.num_buckets for t in offline], device),
                "hot_rows": tensor([t.hot_rows for t in offline]),
                "sorted_bases": tensor(list(accumulate([0] + _sizes(chosen)[:-1]))),
                "sorted_starts": tensor(list(accumulate([0] + [t.hot_rows for t in chosen][:-1]))),
                "map_sizes": tensor([t.row_of_id.numel() for t in dense]),
                "map_starts": tensor(list(accumulate([0] + [t.row_of_id.numel() for t in dense][:-1]))),
            }
        return self._constants

    def _hot_ids(self, device: torch.device) -> Tensor:
        """Every sorted table's hot ids, shifted by ``sorted_bases``, in one ascending array (made again when a
        table's hot ids changed: a load or a reset writes them in place, which bumps their version)."""
        chosen = [self.offline[k] for k in self.sorted]
        key = tuple((t.hot_ids.data_ptr(), t.hot_ids._version) for t in chosen)
        if self._hot is None or self._hot[0] != key or self._hot[1].device != device:
            bases = accumulate([0] + _sizes(chosen)[:-1])
            self._hot = (key, torch.cat([t.hot_ids.to(device) + base for t, base in zip(chosen, bases)]))
        return self._hot[1]

    def __call__(self, ids: Tensor) -> Tensor:
        if not device_path(ids):
            return self.rows_batch(ids)
        self.rows_batch.ranges.check(ids)
        constants = self._constants_on(ids.device)
        columns = ids.index_select(1, constants["offline"])  # (batch, offline tables)
        hashed = hash_columns(columns, [t.hash for t in self.offline], constants["hashed_rows"]).squeeze(-1)
        rows = hashed.add_(constants["hot_rows"])  # the hashed rows follow each table's hot ones
        if self.sorted:  # a hot id's row is its place among its table's sorted hot ids
            hot = self._hot_ids(ids.device)
            wanted = columns.index_select(1, constants["sorted"]) + constants["sorted_bases"]
            position = torch.searchsorted(hot, wanted).clamp_max_(hot.numel() - 1)
            found = hot[position] == wanted
            rows = rows.index_copy(
                1,
                constants["sorted"],
                torch.where(found, position - constants["sorted_starts"], rows.index_select(1, constants["sorted"])),
            )
        if self.maps is not None:  # a dense map: row_of_id[id] (-1: not hot; ids past the map: not hot)
            looked = columns.index_select(1, constants["dense"])
            sizes = constants["map_sizes"]
            at = torch.minimum(looked, sizes - 1) + constants["map_starts"]
            mapped = self.maps.flat().index_select(0, at.view(-1)).view(looked.shape).long()
            hot_ids = (looked < sizes) & (mapped >= 0)
            rows = rows.index_copy(
                1, constants["dense"], torch.where(hot_ids, mapped, rows.index_select(1, constants["dense"]))
            )
        rows = ids.index_copy(1, constants["offline"], rows) if len(self.offline) < len(self.tables) else rows
        pack = self.rows_batch.pack
        return pack.gather((rows + pack.row_offsets).unsqueeze(-1)).squeeze(-2)
