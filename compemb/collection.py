"""EmbeddingCollection: one compression method over many features, within one overall budget.

Two ways to spend the budget (``sharing=``):

- ``"per_feature"`` (default): one table per feature, the budget split in proportion to the features' full
  sizes (or by the method's ``split_budget``: MDE's power rule). A feature whose share would be at least its full
  size, whose full table is no bigger than an even share of what is left, or whose nearest compressed size is no
  smaller than its full table, stays full, and what that leaves goes to the others (a 10-id feature compressed into
  one shared row would be erased for almost no memory; keeping it costs the large features next to nothing). Small
  tables take their nearest size and the larger ones absorb the rounding, so the total meets the budget within 1%.
  At high ratios every feature's share falls below a few rows and most methods cannot be built: use ``"shared"``.
- ``"shared"``: one table (one method instance) over every feature's ids, feature f's id x read as
  ``offset_f + x`` in a vocabulary of all the features' ids together, as CAFE's code and the VLDB 2024
  compression benchmark do. The whole budget goes to the one table, so every ratio up to 10,000x of Criteo
  Kaggle (33.8M ids x 16: 54k params) is buildable; the method decides which ids share (MDE is given the
  features as blocks, each with a dim of its own). Its init scale is
  that of the one full table of all ids (``init="dlrm"``: sqrt(1/sum n)). The full table is built shared too
  when asked: it holds the same rows either way, but one table starts every id at sqrt(1/sum n) where per-feature
  tables start a feature of n ids at sqrt(1/n), and that moves its BCE (on the Kaggle-shape set: val BCE 0.4314
  shared against 0.4274 per feature), so the shared full table is the baseline of the shared methods.

``memory()`` reports every table and the total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from compemb.budget import (
    BUDGET_TOLERANCE,
    FLOAT_BYTES,
    BudgetError,
    MemoryReport,
    full_table_bytes,
    nearest_size,
    resolve_budget,
)
from compemb.checks import assert_ids_in_range
from compemb.embeddings.base import CompressedEmbedding
from compemb.embeddings.full import FullEmbedding
from compemb.feature_methods import assign_methods, format_feature_methods, is_per_feature
from compemb.kernels import device_path
from compemb.registry import get_method, make_embedding
from compemb.table_batch import TableBatch

SHARING = ("per_feature", "shared")


POOLINGS = ("sum", "mean")


@dataclass(frozen=True)
class Feature:
    """A categorical feature: its name, how many ids it has, and how a row's ids are pooled.

    ``pooling=None`` (one-hot, as Criteo's): one id per row, a column of the collection's ``ids``.
    ``"sum"`` / ``"mean"`` (multi-hot, e.g. a user's last k items): a bag of ids per row, given as :class:`Bags`
    and reduced to one vector (an empty bag gives zeros).
    """

    name: str
    num_embeddings: int
    pooling: str | None = None

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"feature {self.name!r}: pooling must be None or one of {POOLINGS}, got {self.pooling!r}")


@dataclass(frozen=True)
class Bags:
    """A multi-hot feature's ids for a batch, laid out as a KeyedJaggedTensor carries one feature.

    Row b's bag is ``values[offsets[b]:offsets[b + 1]]``: ``offsets`` has ``batch + 1`` entries, from 0 to
    ``len(values)``. ``weights`` (optional, the shape of ``values``) scale each id's vector (sum pooling only).
    """

    values: Tensor
    offsets: Tensor
    weights: Tensor | None = None

    @classmethod
    def from_offsets(
        cls, values: Tensor, offsets: Tensor, weights: Tensor | None = None, *, include_last_offset: bool = False
    ) -> Bags:
        """Bags from nn.EmbeddingBag's offsets: one per bag (``include_last_offset=False``, the bags then end at
        ``len(values)``), or one per bag and a last one that must be ``len(values)``.

        Example::

            >>> Bags.from_offsets(torch.arange(5), torch.tensor([0, 2])).offsets.tolist()
            [0, 2, 5]
        """
        if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.is_floating_point():
            raise ValueError("bag offsets must be a 1-D integer tensor")
        if include_last_offset:
            if len(offsets) == 0 or int(offsets[-1]) != len(values):
                last = int(offsets[-1]) if len(offsets) else None
                raise ValueError(
                    f"with include_last_offset, offsets[-1] must be len(values) = {len(values)}, got {last}"
                )
            return cls(values, offsets.long(), weights)
        end = torch.tensor([len(values)], dtype=torch.int64, device=offsets.device)
        return cls(values, torch.cat([offsets.long(), end]), weights)

    @classmethod
    def from_lengths(cls, values: Tensor, lengths: Tensor, weights: Tensor | None = None) -> Bags:
        """Bags from per-row lengths (as KJTs also carry them) instead of offsets."""
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths.long(), 0, out=offsets[1:])
        return cls(values, offsets, weights)


@dataclass(frozen=True)
class CollectionMemory(MemoryReport):
    """Bytes stored by every feature's table: their sum, by kind, as one table's :class:`MemoryReport` says them
    (``.total`` is all bytes, an int, for a table and a collection alike), and each feature's (``per_feature``)."""

    per_feature: dict[str, MemoryReport] = field(default_factory=dict)

    @classmethod
    def of(cls, per_feature: dict[str, MemoryReport]) -> CollectionMemory:
        """The sum of ``per_feature``'s reports, keeping them."""
        return cls(
            sum(r.float_bytes for r in per_feature.values()),
            sum(r.index_bytes for r in per_feature.values()),
            sum(r.sketch_bytes for r in per_feature.values()),
            per_feature,
        )


class EmbeddingCollection(torch.nn.Module):
    """One method's tables for many features, sharing one budget.

    Args:
        features: the features, in the order of the id columns.
        embedding_dim: the vectors' size, the same for every feature.
        method: a registered method name (``compemb.METHODS``) for every feature, or a method per feature
            (:mod:`compemb.feature_methods`: ``{"C1": "full", "C3": "cce-hybrid", "*": "hash"}`` or
            ``"C1=full;C3=cce-hybrid;*=hash"``; per_feature sharing). The features whose method is ``full`` take
            their full size from the budget first; the others share the rest in proportion to their full sizes,
            each built by its own method (a small one kept full by the rules below).
        compression, num_params: the budget for all features together (one of the two).
        seed: feature i's table is built with ``seed + i``.
        sharing: ``"per_feature"`` (a table per feature) or ``"shared"`` (one table over all ids); see the module
            docstring.
        frequencies: per-feature id counts ``{name: counts}``, for methods built from them
            (``needs_frequencies``, as ``offline``): each table gets its feature's counts as ``frequencies=``.
            Ignored by other methods.
        batch_tables: look up the per-feature tables of a method that can in one pass (``table_batch``: one
            vectorised index computation and one gather over their weights, as TorchRec's table-batched
            embeddings; see :mod:`compemb.table_batch`); ``False``: one lookup per table. Both give the same
            vectors and gradients.
        options: passed to every compressed table (``sparse=True``, ``columns=4``, ...); ``sparse=True`` gives the
            tables of methods without rows (dhe, tt) dense gradients, the small features' full tables sparse ones.

    Shape:
        ids ``(batch, num_features)``, one id per feature -> ``(batch, num_features, embedding_dim)``. With
        multi-hot features (``Feature(..., pooling="sum")``), ``ids`` holds the one-hot features' columns in
        order and ``bags`` each multi-hot feature's :class:`Bags`; the output has every feature in order.

    Example::

        >>> features = [Feature("C1", 100_000), Feature("C2", 5_000), Feature("C3", 3)]
        >>> collection = EmbeddingCollection(features, 16, "qr", compression=10)
        >>> collection(torch.tensor([[7, 8, 2]])).shape
        torch.Size([1, 3, 16])
        >>> type(collection.embeddings["C3"]).__name__  # QR cannot make 3 ids smaller: kept full
        'FullEmbedding'
    """

    def __init__(
        self,
        features: Sequence[Feature],
        embedding_dim: int,
        method: str | Mapping[str, str],
        *,
        compression: float | None = None,
        num_params: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        frequencies: Mapping[str, Tensor] | None = None,
        sharing: str = "per_feature",
        batch_tables: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        self.batch_tables = batch_tables
        self._groups: list[tuple[list[int], TableBatch | None]] = []
        self._groups_key: tuple[int, ...] = ()
        self._group_tensors: tuple[Any, list[Tensor], Tensor | None] = (None, [], None)
        if sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
        if not features:
            raise ValueError("an EmbeddingCollection needs at least one feature")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        # each name keys a table in a torch ModuleDict: torch refuses its own attribute names and dotted ones
        unusable = [name for name in names if not name or "." in name or hasattr(torch.nn.ModuleDict, name)]
        if unusable:
            raise ValueError(
                f"feature name {unusable[0]!r} cannot name a table (torch's ModuleDict takes no empty or "
                f"dotted name, nor one of its own attributes such as 'items' or 'type'): rename it, "
                f"e.g. {unusable[0].replace('.', '_') + '_'!r}"
            )
        self.features = list(features)
        self.one_hot = [i for i, f in enumerate(features) if f.pooling is None]
        self.multi_hot = [i for i, f in enumerate(features) if f.pooling is not None]
        # output position of each feature when one-hot vectors come first and pooled bags after them
        self._order = torch.tensor(self.one_hot + self.multi_hot).argsort().tolist()
        self._order_tensor: Tensor | None = None
        self.embedding_dim = embedding_dim
        # one method for every feature, or each its own (compemb.feature_methods): names, options per feature
        self.method = method if isinstance(method, str) else format_feature_methods(method)
        if is_per_feature(method):
            if sharing == "shared":
                raise ValueError("a method per feature needs sharing='per_feature': one shared table has one method")
            assigned = assign_methods(method, names)
        else:
            get_method(method)  # an unknown name raises, listing the methods
            assigned = {name: (method, {}) for name in names}
        self.methods = {name: name_and_options[0] for name, name_and_options in assigned.items()}
        classes = [get_method(self.methods[f.name]) for f in features]
        # sparse=True: sparse gradients for every table with rows (the small features' full ones too); dhe's MLP and
        # tt's cores take dense ones
        full_sparse = options.get("sparse", False)
        table_options = [
            {**options, **assigned[f.name][1], **({"sparse": False} if not cls.sparse_gradients else {})}
            for f, cls in zip(features, classes)
        ]
        total = sum(f.num_embeddings for f in features)
        if compression is None and num_params is None and not any(cls.compresses for cls in classes):
            compression = 1
        self.budget = resolve_budget(total, embedding_dim, compression=compression, num_params=num_params)
        self.sharing = sharing
        cardinalities = torch.tensor([f.num_embeddings for f in features], dtype=torch.int64, device=device)
        self.register_buffer("cardinalities", cardinalities, persistent=False)
        self.register_buffer("offsets", torch.cumsum(cardinalities, 0) - cardinalities, persistent=False)
        one_hot = torch.tensor(self.one_hot, dtype=torch.int64, device=device)
        self.register_buffer("one_hot_cardinalities", cardinalities[one_hot], persistent=False)
        self.register_buffer("one_hot_offsets", self.offsets[one_hot], persistent=False)
        if self.sharing == "shared":
            options = table_options[0]
            common: dict[str, Any] = dict(seed=seed, device=device, name="shared")
            if get_method(method).needs_frequencies:  # every feature's counts, end to end as the ids are
                missing = [f.name for f in features if f.name not in (frequencies or {})]
                common["frequencies"] = None if missing else torch.cat([frequencies[f.name] for f in features])
            if get_method(method).takes_feature_blocks:  # MDE: each feature a block with a dim of its own
                common["blocks"] = [f.num_embeddings for f in features]
            table = make_embedding(
                method, total, embedding_dim, num_params=max(1, round(self.budget.num_params)), **common, **options
            )
            self.embeddings = torch.nn.ModuleDict({"shared": table})
            return
        full_options = {
            key: value
            for key, value in options.items()
            if key in ("mode", "init", "include_last_offset", "padding_idx")
        }
        full_options["sparse"] = full_sparse

        def build(index: int, budget_bytes: int | None, last: bool = False) -> CompressedEmbedding:
            feature, method, options = features[index], self.methods[features[index].name], table_options[index]
            common: dict[str, Any] = dict(seed=seed + index, device=device, name=feature.name)
            if budget_bytes is None:
                return make_embedding("full", feature.num_embeddings, embedding_dim, **common, **full_options)
            if classes[index].needs_frequencies:  # None when missing: the method says what it needs
                common["frequencies"] = (frequencies or {}).get(feature.name)
            params = max(1, budget_bytes // FLOAT_BYTES)
            if last:  # the largest table absorbs the others' rounding: at its nearest size that fits what is left
                for _ in range(8):
                    with nearest_size():
                        table = make_embedding(
                            method, feature.num_embeddings, embedding_dim, num_params=params, **common, **options
                        )
                    excess = table.budgeted_bytes() - budget_bytes
                    if excess <= 0 or params <= 1:
                        return table
                    params = max(1, params - -(-excess // FLOAT_BYTES))
                return table
            with nearest_size():  # the total is checked at the end
                return make_embedding(
                    method, feature.num_embeddings, embedding_dim, num_params=params, **common, **options
                )

        # smallest first: each takes its proportional share of what is left (or stays full when the share
        # would reach its full size) at its nearest size; larger tables absorb the smaller ones' rounding,
        # and the total is checked against the budget at the end
        full = [full_table_bytes(f.num_embeddings, embedding_dim) for f in features]
        tables: dict[int, CompressedEmbedding] = {}
        # the features whose method stores full tables (a method per feature: "C1=full") take their size first
        for index, cls in enumerate(classes):
            if not cls.compresses:
                tables[index] = build(index, None)
        left_bytes = self.budget.num_bytes - sum(table.budgeted_bytes() for table in tables.values())
        if tables and len(tables) < len(features) and left_bytes < FLOAT_BYTES:
            kept = ", ".join(repr(features[i].name) for i in tables)
            raise BudgetError(
                f"the features kept full ({kept}) store {self.budget.num_bytes - left_bytes:,} bytes: "
                f"more than the budget of {self.budget.num_bytes:,} bytes for every table"
            )
        # what the method would give each feature (in proportion to its full table, or MDE's power rule); a mix of
        # methods shares in proportion to the full tables
        single = len(set(self.methods.values())) == 1
        cls = classes[0]
        wanted = (
            cls.split_budget(
                [f.num_embeddings for f in features], embedding_dim, self.budget.num_bytes, **table_options[0]
            )
            if single
            else full
        )
        # a proportional split keeps small features full itself (below); a method's own split already decides
        proportional = not single or cls.split_budget.__func__ is CompressedEmbedding.split_budget.__func__  # type: ignore[attr-defined]
        order = sorted((i for i in range(len(features)) if i not in tables), key=lambda index: full[index])
        left_wanted = sum(wanted[i] for i in order)
        for position, index in enumerate(order):
            share = left_bytes * wanted[index] / left_wanted
            even_share = left_bytes / (len(order) - position)
            # a table no bigger than an even share of what is left stays full: compressing a 10-id feature
            # into one shared row would erase it for almost no memory
            if share >= full[index] or (proportional and full[index] <= even_share):
                table = build(index, None)
            elif left_bytes < FLOAT_BYTES:
                self._explain_budget(features, full, table_options, [i for i in order if i not in tables])
                raise BudgetError(
                    f"a budget of {self.budget.num_params:,.0f} params is used up before feature "
                    f"{features[index].name!r}: the smaller features' tables took it"
                )
            else:
                table = build(index, round(share), last=position == len(order) - 1)
                if table.budgeted_bytes() >= full[index]:  # its nearest compressed size is no smaller
                    table = build(index, None)
            tables[index] = table
            left_bytes -= table.budgeted_bytes()
            left_wanted -= wanted[index]
        stored = sum(table.budgeted_bytes() for table in tables.values())  # as each method accounts
        miss = (stored - self.budget.num_bytes) / self.budget.num_bytes
        every_table_full = all(not table.compresses for table in tables.values())
        # tables grow by whole rows: a tiny budget may stay under by up to a row per feature
        under_tolerance = max(BUDGET_TOLERANCE, len(features) * embedding_dim * FLOAT_BYTES / self.budget.num_bytes)
        if miss > BUDGET_TOLERANCE or (miss < -under_tolerance and not every_table_full):
            self._explain_budget(features, full, table_options, [i for i in order if tables[i].compresses])
            raise BudgetError(
                f"EmbeddingCollection of {self.method!r}: its tables store {stored:,} bytes, {miss:+.1%} from the budget "
                f"of {self.budget.num_bytes:,} bytes"
            )
        self.embeddings = torch.nn.ModuleDict({features[i].name: tables[i] for i in range(len(features))})
        _run_lookups_eagerly()

    def _explain_budget(
        self, features: Sequence[Feature], full: list[int], options: list[dict[str, Any]], compressed: list[int]
    ) -> None:
        """Raise the method's own BudgetError where one is the reason a per-feature split missed the budget.

        A method with per-id bytes (honest ``cce``: c pointers per id) reaches only bands of ratios, which depend on
        a table's size; every compressed feature gets about the collection's ratio, so each ``compressed`` feature's
        table at that ratio, built strictly (largest first), says which one cannot and which bands it reaches.
        """
        for index in sorted(compressed, key=lambda index: -full[index]):
            method = self.methods[features[index].name]
            if get_method(method).per_id_bytes == 0:
                continue
            share = self.budget.num_bytes * full[index] / sum(full)
            try:
                make_embedding(
                    method,
                    features[index].num_embeddings,
                    self.embedding_dim,
                    num_params=max(1, round(share / FLOAT_BYTES)),
                    device="meta",
                    **options[index],
                )
            except BudgetError as error:
                raise BudgetError(
                    f"feature {features[index].name!r} ({features[index].num_embeddings:,} ids) at "
                    f"the collection's ratio: {error}"
                ) from None

    # torch.compile compiles the model around the lookups and runs them as they are (torch.compiler.disable, applied
    # when the first collection is built: _run_lookups_eagerly)
    def forward(self, ids: Tensor | None, bags: Mapping[str, Bags] | None = None) -> Tensor:
        """Vectors of every feature: ``(batch, num_features, dim)``.

        ``ids`` ``(batch, number of one-hot features)`` (``None`` when there are none); ``bags`` ``{name: Bags}``
        for the multi-hot features (see the class docstring).
        """
        if not self.multi_hot:
            if bags:
                raise ValueError(f"bags given for {sorted(bags)}, but no feature is multi-hot")
            return self._one_hot_vectors(ids)
        names = [self.features[i].name for i in self.multi_hot]
        if bags is None or set(bags) != set(names):
            raise ValueError(f"bags must be given for the multi-hot features {names}, got {sorted(bags or {})}")
        batch = None if ids is None else ids.shape[0]
        pooled = [self.pool(self.features[i].name, bags[self.features[i].name], batch=batch) for i in self.multi_hot]
        parts = [torch.stack(pooled, dim=1)]
        if self.one_hot:
            parts.insert(0, self._one_hot_vectors(ids))
        vectors = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self._order == sorted(self._order):
            return vectors
        if self._order_tensor is None or self._order_tensor.device != vectors.device:  # made once, not every step
            self._order_tensor = torch.tensor(self._order, device=vectors.device)
        return vectors.index_select(1, self._order_tensor)

    def pool(self, name: str, bags: Bags, batch: int | None = None, pooling: str | None = None) -> Tensor:
        """One vector per row of the feature ``name``'s bags, pooled by its ``pooling``: ``(batch, dim)``.

        A one-hot feature may be read this way too (pooled by sum, or by ``pooling`` when given), as TorchRec
        feeds every feature as bags. ``batch``, when given, is the number of rows the bags must have.
        """
        index = self._index_of(name)
        feature = self.features[index]
        pooling = pooling or feature.pooling or "sum"
        if pooling not in POOLINGS:
            raise ValueError(f"feature {name!r}: pooling must be one of {POOLINGS}, got {pooling!r}")
        values, offsets, weights = bags.values, bags.offsets, bags.weights
        where = f"feature {name!r}"
        for what, tensor in (("values", values), ("offsets", offsets)):
            if not isinstance(tensor, Tensor) or tensor.dim() != 1 or tensor.is_floating_point():
                raise ValueError(f"{where}: bag {what} must be a 1-D integer tensor")
        if len(offsets) == 0 or (batch is not None and len(offsets) != batch + 1):
            rows = "at least 1" if batch is None else batch + 1
            raise ValueError(f"{where}: bag offsets must have batch + 1 = {rows} entries, got {len(offsets)}")
        if not device_path(offsets) and int(offsets[-1]) != values.numel():  # the table checks the rest
            raise ValueError(f"{where}: offsets[-1] = {int(offsets[-1])} is not the number of values {values.numel()}")
        if weights is not None and pooling != "sum":
            raise ValueError(f"{where}: per-id weights need sum pooling, not {pooling!r}")
        values = values.long()
        if self.sharing == "shared":
            if device_path(values):
                assert_ids_in_range(values, feature.num_embeddings, where)
            elif values.numel() and bool((bad := (values < 0) | (values >= feature.num_embeddings)).any()):
                raise ValueError(f"{where}: id {int(values[bad][0])} is outside [0, {feature.num_embeddings})")
            table = self.embeddings["shared"]
            values = values + self.offsets[index]
        else:
            table = self.embeddings[name]
        # the table takes nn.EmbeddingBag's offsets: batch of them, or batch + 1 if it was built include_last_offset
        vectors = table(values, offsets if table.include_last_offset else offsets[:-1], weights)
        if table.mode == "max":  # no sum or mean can be had from a bag's maximum
            raise ValueError(
                f"{where}: its table reduces bags by max (mode='max'); pooling {pooling!r} needs a table "
                f"built with mode 'sum' or 'mean'"
            )
        if table.mode != pooling:  # the table reduces by its own mode; convert sum <-> mean by the bag sizes
            sizes = (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(vectors.dtype)
            vectors = vectors / sizes if pooling == "mean" else vectors * sizes
        return vectors

    def _index_of(self, name: str) -> int:
        for index, feature in enumerate(self.features):
            if feature.name == name:
                return index
        raise KeyError(f"no feature {name!r} in {[f.name for f in self.features]}")

    def _one_hot_vectors(self, ids: Tensor | None) -> Tensor:
        """The one-hot features' vectors: ``(batch, len(self.one_hot))`` -> ``(batch, len(self.one_hot), dim)``."""
        columns = [self.features[i].name for i in self.one_hot]
        if ids is None or ids.dim() != 2 or ids.shape[1] != len(columns):
            shape = None if ids is None else tuple(ids.shape)
            raise ValueError(f"ids must have shape (batch, {len(columns)}) for features {columns}, got {shape}")
        if self.sharing == "shared":
            if device_path(ids):  # no host round trip per lookup: a device-side assert
                assert_ids_in_range(ids, self.one_hot_cardinalities, "the shared table's features")
            # an id past its feature's range would read the next feature's rows silently
            elif bool((bad := (ids < 0) | (ids >= self.one_hot_cardinalities)).any()):
                row, column = (int(v) for v in bad.nonzero()[0])
                feature = self.features[self.one_hot[column]]
                raise ValueError(
                    f"feature {feature.name!r}: id {int(ids[row, column])} is outside [0, {feature.num_embeddings})"
                )
            shifted = ids + self.one_hot_offsets
            return self.embeddings["shared"](shifted.reshape(-1)).view(*ids.shape, self.embedding_dim)
        tables: list[CompressedEmbedding] = [self.embeddings[name] for name in columns]  # type: ignore[misc]
        if not self.batch_tables:
            return torch.stack([table(ids[:, column]) for column, table in enumerate(tables)], dim=1)
        ids = tables[0]._as_int64(ids, "ids")
        groups = self._table_groups(tables)
        if len(groups) == 1 and groups[0][1] is not None:  # one method everywhere: one batch, columns in order
            return groups[0][1](ids)
        columns, inverse = self._group_indices(groups, ids.device)
        parts = [
            batch(ids.index_select(1, chosen))
            if batch is not None
            else tables[positions[0]](ids[:, positions[0]]).unsqueeze(1)
            for (positions, batch), chosen in zip(groups, columns)
        ]
        vectors = torch.cat(parts, dim=1)
        return vectors if inverse is None else vectors.index_select(1, inverse)

    def _group_indices(
        self, groups: list[tuple[list[int], TableBatch | None]], device: torch.device
    ) -> tuple[list[Tensor], Tensor | None]:
        """Each group's columns, and the permutation back to column order (None: already in order), as index
        tensors on ``device``, made once per grouping: made from Python lists every step they would be a copy
        from the host in every step."""
        key = (self._groups_key, device)
        if self._group_tensors[0] != key:
            columns = [torch.tensor(positions, dtype=torch.int64, device=device) for positions, _ in groups]
            order = [position for positions, _ in groups for position in positions]
            inverse = None if order == sorted(order) else torch.tensor(order, device=device).argsort()
            self._group_tensors = (key, columns, inverse)
        return self._group_tensors[1], self._group_tensors[2]

    def _table_groups(self, tables: list[CompressedEmbedding]) -> list[tuple[list[int], TableBatch | None]]:
        """The table batches (compemb.table_batch), made again whenever a table has been replaced."""
        key = tuple(map(id, tables))
        if self._groups_key != key:
            self._groups, self._groups_key = batch_groups(tables), key
        return self._groups

    def table_batches(self) -> list[TableBatch]:
        """The table batches of the last lookup (those with ``apply_pending`` update their tables together after
        the optimizer step: :func:`compemb.embeddings.adaptive.end_step`)."""
        return [batch for _, batch in self._groups if batch is not None]

    def memory(self) -> CollectionMemory:
        """Every table's MemoryReport (per feature, or the one ``"shared"``), and their total (``.total``)."""
        return CollectionMemory.of({name: table.memory() for name, table in self.embeddings.items()})

    def extra_repr(self) -> str:
        total = self.memory().total
        full = sum(full_table_bytes(f.num_embeddings, self.embedding_dim) for f in self.features)
        sharing = ", sharing='shared'" if self.sharing == "shared" else ""
        return f"method={self.method!r}, features={len(self.features)}{sharing}, compression={full / total:.1f}x"


def _run_lookups_eagerly() -> None:
    """Mark ``EmbeddingCollection.forward`` ``torch.compiler.disable``, once: torch.compile then compiles the model
    around the lookups and runs them as they are (their id checks, packed-weight checks, compiled kernels and sparse
    gradients are not traceable, and graph breaks inside would cost more). Done when the first collection is built,
    not at import: importing torch._dynamo for it costs ~2 s, which ``compemb --help`` should not pay."""
    forward = EmbeddingCollection.__dict__["forward"]
    if not getattr(forward, "_runs_eagerly", False):
        eager = torch.compiler.disable(forward)
        eager._runs_eagerly = True  # type: ignore[attr-defined]
        EmbeddingCollection.forward = eager  # type: ignore[method-assign]


def batch_groups(tables: Sequence[torch.nn.Module]) -> list[tuple[list[int], TableBatch | None]]:
    """Group tables (by position) into batches their method can look up together; ``None``: one at a time.

    Tables group when they are of one class, with one ``sparse``, and the class's ``table_batch`` accepts them.
    """
    keys: dict[tuple, list[int]] = {}
    for position, table in enumerate(tables):
        batchable = isinstance(table, CompressedEmbedding)
        keys.setdefault((type(table), table.sparse) if batchable else ("alone", position), []).append(position)

    def plain(positions: list[int]) -> bool:  # a padding id or max pooling needs each table's own forward
        return all(
            getattr(tables[p], "padding_idx", None) is None and getattr(tables[p], "mode", "sum") != "max"
            for p in positions
        )

    groups: list[tuple[list[int], TableBatch | None]] = []
    for key in list(keys):  # a method whose batch takes the full tables beside it (hash): one batch, one update
        joins, full_key = getattr(key[0], "table_batch_with_full", None), (FullEmbedding, key[1])
        if joins is None or full_key not in keys or key not in keys:
            continue
        together = sorted(keys[key] + keys[full_key])
        batch = joins([tables[p] for p in together]) if plain(together) else None
        if batch is not None:
            groups.append((together, batch))
            del keys[key], keys[full_key]
    for positions in keys.values():
        first = tables[positions[0]]
        members = [tables[p] for p in positions]
        batch = (
            type(first).table_batch(members) if isinstance(first, CompressedEmbedding) and plain(positions) else None
        )
        if batch is None:
            groups.extend(([p], None) for p in positions)
        else:
            groups.append((positions, batch))
    return groups
