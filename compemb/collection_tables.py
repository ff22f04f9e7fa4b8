"""The tables of an :class:`~compemb.collection.EmbeddingCollection`, built within its budget.

``sharing="shared"``: :func:`build_shared_table`, one table over every feature's ids. ``sharing="per_feature"``:
:class:`PerFeatureTableBuilder`, a table per feature, the budget shared out by the rules the collection's module
docstring states (features kept full, shares in proportion or by the method's own split, the largest table
absorbing the others' rounding, the total checked against the budget).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from compemb.budget import BUDGET_TOLERANCE, FLOAT_BYTES, Budget, BudgetError, full_table_bytes, nearest_size
from compemb.embeddings.base import CompressedEmbedding
from compemb.features import Feature
from compemb.registry import get_method, make_embedding

# the options a small feature's full table takes from the collection's (the rest are the compressed method's)
FULL_TABLE_OPTIONS = ("mode", "init", "include_last_offset", "padding_idx")


def table_options(
    features: Sequence[Feature],
    options: Mapping[str, Any],
    assigned: Mapping[str, tuple[str, dict[str, Any]]],
    classes: Sequence[type[CompressedEmbedding]],
) -> list[dict[str, Any]]:
    """Each feature's table options: the collection's, then the feature's own (``assigned``: method, options)."""
    # sparse=True: sparse gradients for every table with rows (the small features' full ones too); dhe's MLP and
    # tt's cores take dense ones
    return [
        {**options, **assigned[f.name][1], **({"sparse": False} if not cls.sparse_gradients else {})}
        for f, cls in zip(features, classes)
    ]


def build_shared_table(
    features: Sequence[Feature],
    embedding_dim: int,
    method: str,
    budget: Budget,
    options: Mapping[str, Any],
    *,
    seed: int,
    device: torch.device | str | None,
    frequencies: Mapping[str, Tensor] | None,
) -> CompressedEmbedding:
    """The one table of ``method`` over every feature's ids (feature f's id x is its row ``offset_f + x``)."""
    total = sum(f.num_embeddings for f in features)
    common: dict[str, Any] = dict(seed=seed, device=device, name="shared")
    if get_method(method).needs_frequencies:  # every feature's counts, end to end as the ids are
        counts: Mapping[str, Tensor] = frequencies or {}
        missing = [f.name for f in features if f.name not in counts]
        common["frequencies"] = None if missing else torch.cat([counts[f.name] for f in features])
    if get_method(method).takes_feature_blocks:  # MDE: each feature a block with a dim of its own
        common["blocks"] = [f.num_embeddings for f in features]
    return make_embedding(
        method, total, embedding_dim, num_params=max(1, round(budget.num_params)), **common, **options
    )


class PerFeatureTableBuilder:
    """Builds one table per feature, each by its feature's method, sharing one budget out among them.

    Args:
        features: the collection's features, in order (feature i's table is built with ``seed + i``).
        embedding_dim: every table's dim.
        methods: each feature's method name, by feature name.
        classes: each feature's method class, in feature order.
        options: each feature's table options (:func:`table_options`), in feature order.
        collection_options: the collection's own options, of which a feature kept full takes
            ``FULL_TABLE_OPTIONS`` and ``sparse``.
        budget: the budget of all tables together.
        label: the collection's method as its errors name it.
    """

    def __init__(
        self,
        features: Sequence[Feature],
        embedding_dim: int,
        methods: Mapping[str, str],
        classes: Sequence[type[CompressedEmbedding]],
        options: Sequence[dict[str, Any]],
        collection_options: Mapping[str, Any],
        budget: Budget,
        *,
        label: str,
        seed: int,
        device: torch.device | str | None,
        frequencies: Mapping[str, Tensor] | None,
    ) -> None:
        self.features = features
        self.embedding_dim = embedding_dim
        self.methods = methods
        self.classes = classes
        self.options = options
        self.budget = budget
        self.label = label
        self.seed = seed
        self.device = device
        self.frequencies = frequencies
        self.full_options = {key: value for key, value in collection_options.items() if key in FULL_TABLE_OPTIONS}
        self.full_options["sparse"] = collection_options.get("sparse", False)
        self.full = [full_table_bytes(f.num_embeddings, embedding_dim) for f in features]

    def build_tables(self) -> dict[str, CompressedEmbedding]:
        """Every feature's table, by feature name in feature order; BudgetError when they cannot meet the budget."""
        # the features whose method stores full tables (a method per feature: "C1=full") take their size first
        tables = {index: self.build_table(index, None) for index, cls in enumerate(self.classes) if not cls.compresses}
        left_bytes = self.budget.num_bytes - sum(table.budgeted_bytes() for table in tables.values())
        if tables and len(tables) < len(self.features) and left_bytes < FLOAT_BYTES:
            kept = ", ".join(repr(self.features[i].name) for i in tables)
            raise BudgetError(
                f"the features kept full ({kept}) store {self.budget.num_bytes - left_bytes:,} bytes: "
                f"more than the budget of {self.budget.num_bytes:,} bytes for every table"
            )
        order = self._share_out(tables, left_bytes)
        self._check_total(tables, order)
        return {self.features[i].name: tables[i] for i in range(len(self.features))}

    def build_table(self, index: int, budget_bytes: int | None, last: bool = False) -> CompressedEmbedding:
        """Feature ``index``'s table in ``budget_bytes`` at its nearest size (``None``: its full table); the
        ``last`` one at its nearest size that fits ``budget_bytes``."""
        feature, method, options = self.features[index], self.methods[self.features[index].name], self.options[index]
        common: dict[str, Any] = dict(seed=self.seed + index, device=self.device, name=feature.name)
        if budget_bytes is None:
            return make_embedding("full", feature.num_embeddings, self.embedding_dim, **common, **self.full_options)
        if self.classes[index].needs_frequencies:  # None when missing: the method says what it needs
            common["frequencies"] = (self.frequencies or {}).get(feature.name)
        params = max(1, budget_bytes // FLOAT_BYTES)
        if last:  # the largest table absorbs the others' rounding: at its nearest size that fits what is left
            for _ in range(8):
                with nearest_size():
                    table = make_embedding(
                        method, feature.num_embeddings, self.embedding_dim, num_params=params, **common, **options
                    )
                excess = table.budgeted_bytes() - budget_bytes
                if excess <= 0 or params <= 1:
                    return table
                params = max(1, params - -(-excess // FLOAT_BYTES))
            return table
        with nearest_size():  # the total is checked at the end
            return make_embedding(
                method, feature.num_embeddings, self.embedding_dim, num_params=params, **common, **options
            )

    def _share_out(self, tables: dict[int, CompressedEmbedding], left_bytes: int) -> list[int]:
        """Build the tables not in ``tables`` yet (into it) from the ``left_bytes`` the others left; returns their
        indices in the order built."""
        features, full = self.features, self.full
        # smallest first: each takes its proportional share of what is left (or stays full when the share
        # would reach its full size) at its nearest size; larger tables absorb the smaller ones' rounding,
        # and the total is checked against the budget at the end
        # what the method would give each feature (in proportion to its full table, or MDE's power rule); a mix of
        # methods shares in proportion to the full tables
        single = len(set(self.methods.values())) == 1
        cls = self.classes[0]
        wanted = (
            cls.split_budget(
                [f.num_embeddings for f in features], self.embedding_dim, self.budget.num_bytes, **self.options[0]
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
                table = self.build_table(index, None)
            elif left_bytes < FLOAT_BYTES:
                self._explain_budget([i for i in order if i not in tables])
                raise BudgetError(
                    f"a budget of {self.budget.num_params:,.0f} params is used up before feature "
                    f"{features[index].name!r}: the smaller features' tables took it"
                )
            else:
                table = self.build_table(index, round(share), last=position == len(order) - 1)
                if table.budgeted_bytes() >= full[index]:  # its nearest compressed size is no smaller
                    table = self.build_table(index, None)
            tables[index] = table
            left_bytes -= table.budgeted_bytes()
            left_wanted -= wanted[index]
        return order

    def _check_total(self, tables: dict[int, CompressedEmbedding], order: list[int]) -> None:
        """BudgetError unless every table together meets the budget (``order``: the tables shared out)."""
        stored = sum(table.budgeted_bytes() for table in tables.values())  # as each method accounts
        miss = (stored - self.budget.num_bytes) / self.budget.num_bytes
        every_table_full = all(not table.compresses for table in tables.values())
        # tables grow by whole rows: a tiny budget may stay under by up to a row per feature
        under_tolerance = max(
            BUDGET_TOLERANCE, len(self.features) * self.embedding_dim * FLOAT_BYTES / self.budget.num_bytes
        )
        if miss > BUDGET_TOLERANCE or (miss < -under_tolerance and not every_table_full):
            self._explain_budget([i for i in order if tables[i].compresses])
            raise BudgetError(
                f"EmbeddingCollection of {self.label!r}: its tables store {stored:,} bytes, {miss:+.1%} from the "
                f"budget of {self.budget.num_bytes:,} bytes"
            )

    def _explain_budget(self, compressed: list[int]) -> None:
        """Raise the method's own BudgetError where one is the reason a per-feature split missed the budget.

        A method with per-id bytes (honest ``cce``: c pointers per id) reaches only bands of ratios, which depend on
        a table's size; every compressed feature gets about the collection's ratio, so each ``compressed`` feature's
        table at that ratio, built strictly (largest first), says which one cannot and which bands it reaches.
        """
        features, full, options = self.features, self.full, self.options
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
