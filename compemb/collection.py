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
from typing import Any, cast

import torch
from torch import Tensor

from compemb.budget import MemoryReport, full_table_bytes, resolve_budget
from compemb.checks import assert_ids_in_range
from compemb.collection_tables import PerFeatureTableBuilder, build_shared_table, table_options
from compemb.embeddings.base import CompressedEmbedding
from compemb.feature_methods import assign_methods, format_feature_methods, is_per_feature
from compemb.features import POOLINGS, Bags, Feature
from compemb.kernels import device_path
from compemb.registry import get_method
from compemb.table_batch import TableBatch
from compemb.table_groups import batch_groups

# the names `from compemb.collection import ...` gives: Feature and Bags live in compemb.features, batch_groups
# in compemb.table_groups
__all__ = ["POOLINGS", "SHARING", "Bags", "CollectionMemory", "EmbeddingCollection", "Feature", "batch_groups"]

SHARING = ("per_feature", "shared")


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

    # buffers (_register_offsets)
    cardinalities: Tensor
    offsets: Tensor
    one_hot_cardinalities: Tensor
    one_hot_offsets: Tensor

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
        _check_features(features, sharing)
        self._set_features(features, embedding_dim)
        assigned = self._assign_methods(method, sharing)
        classes = [get_method(self.methods[f.name]) for f in features]
        options_per_table = table_options(features, options, assigned, classes)
        total = sum(f.num_embeddings for f in features)
        if compression is None and num_params is None and not any(cls.compresses for cls in classes):
            compression = 1
        self.budget = resolve_budget(total, embedding_dim, compression=compression, num_params=num_params)
        self.sharing = sharing
        self._register_offsets(device)
        if self.sharing == "shared":
            table = build_shared_table(
                features,
                embedding_dim,
                method,  # type: ignore[arg-type]  # one method: a method per feature is refused with "shared"
                self.budget,
                options_per_table[0],
                seed=seed,
                device=device,
                frequencies=frequencies,
            )
            self.embeddings = torch.nn.ModuleDict({"shared": table})
            _run_lookups_eagerly()  # (as per feature: a process that builds only shared collections compiles too)
            return
        builder = PerFeatureTableBuilder(
            features,
            embedding_dim,
            self.methods,
            classes,
            options_per_table,
            options,
            self.budget,
            label=self.method,
            seed=seed,
            device=device,
            frequencies=frequencies,
        )
        self.embeddings = torch.nn.ModuleDict(builder.build_tables())
        _run_lookups_eagerly()

    def _set_features(self, features: Sequence[Feature], embedding_dim: int) -> None:
        """The features, which are one-hot and which multi-hot, and the order the output puts them back in."""
        self.features = list(features)
        self.one_hot = [i for i, f in enumerate(features) if f.pooling is None]
        self.multi_hot = [i for i, f in enumerate(features) if f.pooling is not None]
        # output position of each feature when one-hot vectors come first and pooled bags after them
        self._order = torch.tensor(self.one_hot + self.multi_hot).argsort().tolist()
        self._order_tensor: Tensor | None = None
        self.embedding_dim = embedding_dim

    def _assign_methods(self, method: str | Mapping[str, str], sharing: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """Each feature's method and its own options, by feature name; sets ``method`` and ``methods``."""
        names = [f.name for f in self.features]
        # one method for every feature, or each its own (compemb.feature_methods): names, options per feature
        self.method = method if isinstance(method, str) else format_feature_methods(method)
        if is_per_feature(method):
            if sharing == "shared":
                raise ValueError("a method per feature needs sharing='per_feature': one shared table has one method")
            assigned = assign_methods(method, names)
        else:
            method = cast(str, method)  # one method's name: every mapping is per feature
            get_method(method)  # an unknown name raises, listing the methods
            assigned = {name: (method, {}) for name in names}
        self.methods = {name: name_and_options[0] for name, name_and_options in assigned.items()}
        return assigned

    def _register_offsets(self, device: torch.device | str | None) -> None:
        """Buffers of each feature's id count and first row in a vocabulary of every feature's ids, all features'
        and the one-hot ones'."""
        cardinalities = torch.tensor([f.num_embeddings for f in self.features], dtype=torch.int64, device=device)
        self.register_buffer("cardinalities", cardinalities, persistent=False)
        self.register_buffer("offsets", torch.cumsum(cardinalities, 0) - cardinalities, persistent=False)
        one_hot = torch.tensor(self.one_hot, dtype=torch.int64, device=device)
        self.register_buffer("one_hot_cardinalities", cardinalities[one_hot], persistent=False)
        self.register_buffer("one_hot_offsets", self.offsets[one_hot], persistent=False)

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
        indices, inverse = self._group_indices(groups, ids.device)
        parts = [
            batch(ids.index_select(1, chosen))
            if batch is not None
            else tables[positions[0]](ids[:, positions[0]]).unsqueeze(1)
            for (positions, batch), chosen in zip(groups, indices)
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
        tables = self.embeddings.items()  # every one a CompressedEmbedding
        return CollectionMemory.of({name: cast(CompressedEmbedding, table).memory() for name, table in tables})

    def extra_repr(self) -> str:
        total = self.memory().total
        full = sum(full_table_bytes(f.num_embeddings, self.embedding_dim) for f in self.features)
        sharing = ", sharing='shared'" if self.sharing == "shared" else ""
        return f"method={self.method!r}, features={len(self.features)}{sharing}, compression={full / total:.1f}x"


def _check_features(features: Sequence[Feature], sharing: str) -> None:
    """ValueError unless ``sharing`` is known and the features are some, with names that can key a table."""
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


def _run_lookups_eagerly() -> None:
    """Mark ``EmbeddingCollection.forward`` ``torch.compiler.disable``, once: torch.compile then compiles the model
    around the lookups and runs them as they are (their id checks, packed-weight checks, compiled kernels and sparse
    gradients are not traceable, and graph breaks inside would cost more). Done when the first collection is built,
    not at import: importing torch._dynamo for it costs ~2 s, which ``compemb --help`` should not pay."""
    forward = EmbeddingCollection.__dict__["forward"]
    if not getattr(forward, "_runs_eagerly", False):
        eager = torch.compiler.disable(forward)
        eager._runs_eagerly = True
        EmbeddingCollection.forward = eager  # type: ignore[method-assign]
