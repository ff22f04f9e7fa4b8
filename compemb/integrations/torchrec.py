"""compemb's compressed tables behind TorchRec's ``EmbeddingBagCollectionInterface``.

``CompressedEmbeddingBagCollection`` takes what an ``EmbeddingBagCollection`` takes (``tables, is_weighted=False,
device=None``, the compression method and its budget as keywords), reads a ``KeyedJaggedTensor`` and returns the
``KeyedTensor`` of pooled vectors that one would, so it drops into TorchRec models (``torchrec.models.dlrm.DLRM``'s
``embedding_bag_collection=``) and training loops unchanged. Its tables are one
:class:`compemb.collection.EmbeddingCollection` per embedding dim (one budget for all), so the vectors equal
compemb's own collection's for the same ids and seed; each table is also ``embedding_bags[<table name>]``, as in an
``EmbeddingBagCollection``, and its parameters and ``state_dict`` keys are that one's (``embedding_bags.t1.weight``).

``torchrec.fx.symbolic_trace`` (and ``torch.fx.symbolic_trace``) traces it as it traces an EmbeddingBagCollection:
each table is one ``call_module`` node, so the graph holds the tables and their parameters and computes what the
module computes; the traced module shares the tables (their ``on_step_end`` is still this module's).
``torch.jit.script`` scripts ``method="full"`` (per-feature tables) as the EmbeddingBagCollection that holds its
parameters; a compressed method's lookups are Python that TorchScript cannot compile, and it says so (TypeError). A
traced graph cannot be scripted either, the full table's included: its ``call_module`` nodes run the tables' Python
``forward``.

Under ``DistributedModelParallel`` it has no sharder (compressed tables are small), so DMP replicates it with
DistributedDataParallel like any dense module; the adaptive methods (CAFE, CCE) gather what changes their state
across the process group themselves (:mod:`compemb.distributed`), so every replica stays the same.

Needs the ``torchrec`` extra (``pip install 'compemb[torchrec]'``; see the README for the ``--no-deps`` step).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.fx
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

try:
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import (
        EmbeddingBagCollection,
        EmbeddingBagCollectionInterface,
        get_embedding_names_by_table,
    )
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
except ImportError as error:  # one line that says what to install
    raise ImportError(
        "compemb.integrations.torchrec needs TorchRec: pip install 'compemb[torchrec]' (torchrec==1.9.2 and "
        "fbgemm-gpu-cpu==1.8.0 with --no-deps; `make torchrec` does it)"
    ) from error

from compemb.checks import assert_ids_in_range
from compemb.collection import EmbeddingCollection
from compemb.embeddings.adaptive import end_step
from compemb.embeddings.base import CompressedEmbedding
from compemb.embeddings.full import FullEmbedding
from compemb.feature_methods import EVERY_OTHER, is_per_feature, parse_feature_methods
from compemb.features import Bags, Feature
from compemb.integrations.torchrec_state import from_ebc_keys, only_ebc_keys
from compemb.kernels import device_path

_POOLINGS = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}
_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}


def _shared_ids(values: Tensor, num_embeddings: int, offset: int, where: str) -> Tensor:
    """A feature's ids in the shared table's vocabulary (``offset + id``), after the range check that
    ``EmbeddingCollection.pool`` makes (an id past its feature's range would read the next feature's rows).
    Wrapped for fx (``torch.fx.wrap``): a traced graph calls it as it is, check included."""
    values = values.long()
    if device_path(values):
        assert_ids_in_range(values, num_embeddings, where)
    elif values.numel() and bool((bad := (values < 0) | (values >= num_embeddings)).any()):
        raise ValueError(f"{where}: id {int(values[bad][0])} is outside [0, {num_embeddings})")
    return values + offset


torch.fx.wrap("_shared_ids")


def _check_configs(tables: list[EmbeddingBagConfig], is_weighted: bool, sharing: str) -> list[int]:
    """The tables' embedding dims, in order of first appearance, once the configs are found usable (TypeError or
    ValueError); a config without feature names gets its table's name as its one feature, as EBC does."""
    if not isinstance(is_weighted, bool):
        hint = (
            f" (the method is a keyword, as EmbeddingBagCollection's signature leaves it: method={is_weighted!r})"
            if isinstance(is_weighted, str)
            else ""
        )
        raise TypeError(f"is_weighted must be a bool, got {is_weighted!r}{hint}")
    if not tables:
        raise ValueError("CompressedEmbeddingBagCollection needs at least one table config")
    names = [table.name for table in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate table name {next(n for n in names if names.count(n) > 1)!r} in {names}")
    for table in tables:
        if table.pooling not in _POOLINGS:
            raise ValueError(f"table {table.name!r}: pooling must be SUM or MEAN, got {table.pooling}")
        if table.data_type not in _DTYPES:
            raise ValueError(f"table {table.name!r}: data_type must be FP32, FP16 or BF16, got {table.data_type}")
        if not table.feature_names:  # as EmbeddingBagCollection does: the table's own name is its feature
            table.feature_names = [table.name]
    if is_weighted and any(table.pooling != PoolingType.SUM for table in tables):
        raise ValueError("weighted KJTs need SUM pooling in every table (as nn.EmbeddingBag's per_sample_weights)")
    dims = list(dict.fromkeys(table.embedding_dim for table in tables))  # in order of first appearance
    if sharing == "shared" and len(dims) > 1:
        raise ValueError(f"one shared table serves one embedding_dim; these tables have {dims}")
    return dims


def _collections_by_dim(
    tables: list[EmbeddingBagConfig],
    dims: list[int],
    method: str | dict[str, str],
    *,
    compression: float | None,
    num_params: int | None,
    sharing: str,
    seed: int,
    device: torch.device | str | None,
    options: dict[str, Any],
) -> dict[str, EmbeddingCollection]:
    """One compemb collection of each embedding dim's tables, keyed ``dim<D>``, in the order of ``dims``."""
    names = [table.name for table in tables]
    # the tables of one dim are one compemb collection (its features are the tables, one-hot from its view,
    # pooled here by each table's pooling); a budget in params is shared out by the full tables' sizes
    full = {dim: sum(t.num_embeddings * dim for t in tables if t.embedding_dim == dim) for dim in dims}
    collections = {}
    per_table = parse_feature_methods(method) if is_per_feature(method) else None
    if per_table is not None:  # a method per table: each dim's collection gets its tables' part of the mapping
        unknown = [name for name in per_table if name != EVERY_OTHER and name not in names]
        if unknown:
            raise ValueError(
                f"the methods name {', '.join(map(repr, unknown))}, not a table here (the tables: {', '.join(names)})"
            )
    for dim in dims:
        members = [t for t in tables if t.embedding_dim == dim]
        share = None if num_params is None else max(1, round(num_params * full[dim] / sum(full.values())))
        group_method = (
            method
            if per_table is None
            else {
                name: spec
                for name, spec in per_table.items()
                if name == EVERY_OTHER or name in {t.name for t in members}
            }
        )
        collections[f"dim{dim}"] = EmbeddingCollection(
            [Feature(table.name, table.num_embeddings) for table in members],
            dim,
            group_method,
            compression=compression,
            num_params=share,
            seed=seed + tables.index(members[0]),
            device=device,
            sharing=sharing,
            **options,
        )
    return collections


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A drop-in ``EmbeddingBagCollection`` whose tables are compressed by ``method``.

    Args:
        tables: TorchRec's table configs (one table each; a table may serve several features, as in TorchRec).
            Pooling SUM or MEAN; ``embedding_dim`` may differ between tables (the tables of one dim are one
            compemb collection) and ``data_type`` FP32, FP16 or BF16 is the dtype the table stores (outputs are
            float32, as EmbeddingBagCollection's).
        is_weighted: the input KJTs carry per-id weights (sum pooling only).
        device: where the tables are built.
        method: a compemb method name (``compemb.METHODS``), e.g. ``"cce"``, ``"cafe"``, ``"hash"``; ``"full"``
            (the default) is the uncompressed table, an EmbeddingBagCollection's. Or a method per table, by table
            name (``{"t1": "full", "*": "cce-hybrid"}``, :mod:`compemb.feature_methods`); the tables of each
            embedding dim share that dim's part of the budget as an EmbeddingCollection's features do.
        compression, num_params: the budget for all tables together (one of the two; neither for ``"full"``).
        sharing: ``"per_feature"`` (a table per config) or ``"shared"`` (one table over every config's ids,
            ``embedding_bags["shared"]``).
        seed: table i is built with ``seed + i``.
        options: passed to every compressed table (``sparse=True``, ``columns=4``, ...).

    ``embedding_bags`` maps each table's name to its module, and the parameter names and ``state_dict`` keys are
    EmbeddingBagCollection's (``embedding_bags.<table>.<name>``), so a checkpoint of an EmbeddingBagCollection loads
    into ``method="full"``. The same modules are also reachable through ``collections`` (compemb's collections, one
    per dim); ``parameters()``, ``named_parameters()`` and ``state_dict()`` hold each once.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> tables = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=1000, feature_names=["f1"]),
        ...           EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=500, feature_names=["f2"])]
        >>> ebc = CompressedEmbeddingBagCollection(tables, method="hash", compression=10)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f1", "f2"], torch.tensor([1, 2, 3, 4]), torch.tensor([1, 1, 2, 0]))
        >>> pooled = ebc(kjt)
        >>> pooled.values().shape, pooled.keys(), type(ebc.embedding_bags["t1"]).__name__
        (torch.Size([2, 16]), ['f1', 'f2'], 'HashingTrickEmbedding')
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        *,
        method: str | dict[str, str] = "full",
        compression: float | None = None,
        num_params: int | None = None,
        sharing: str = "per_feature",
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        dims = _check_configs(tables, is_weighted, sharing)
        self._configs = tables
        self._is_weighted = is_weighted
        self._method = method
        self._poolings = [_POOLINGS[table.pooling] for table in tables]
        # registered before `collections`: the first path to each table names its parameters (EBC's names)
        self.embedding_bags = torch.nn.ModuleDict()
        collections = _collections_by_dim(
            tables,
            dims,
            method,
            compression=compression,
            num_params=num_params,
            sharing=sharing,
            seed=seed,
            device=device,
            options=options,
        )
        self._add_embedding_bags(collections, sharing)
        self.collections = torch.nn.ModuleDict(collections)
        self._embedding_names = [name for names in get_embedding_names_by_table(tables) for name in names]
        self._lengths_per_key = [table.embedding_dim for table in tables for _ in table.feature_names]
        # one feature per table: a KJT of one id per row can go through each collection's batched one-hot lookup
        self._one_feature_per_table = all(len(table.feature_names) == 1 for table in tables)
        self._columns: dict[tuple[str, ...], list[Tensor]] = {}
        self._register_state_dict_hook(only_ebc_keys)
        self._register_load_state_dict_pre_hook(from_ebc_keys, with_module=True)

    def _add_embedding_bags(self, collections: dict[str, EmbeddingCollection], sharing: str) -> None:
        """Each config's table, from its dim's collection, as ``embedding_bags[<table name>]`` (or ``["shared"]``),
        stored in its config's data type."""
        for table in self._configs:
            embeddings = collections[f"dim{table.embedding_dim}"].embeddings
            key = table.name if sharing == "per_feature" else "shared"
            self.embedding_bags[key] = embeddings[key]
            dtype = _DTYPES[table.data_type]  # each table stores its config's data type
            if dtype != torch.float32:
                embeddings[key].to(dtype)

    @property
    def collection(self) -> EmbeddingCollection:
        """The compemb collection of the tables (where every table has one embedding_dim)."""
        if len(self.collections) != 1:
            raise AttributeError(
                f"the tables have {len(self.collections)} embedding dims, one collection each: see .collections"
            )
        return next(iter(self.collections.values()))  # type: ignore[return-value]

    def _collection_of(self, table: EmbeddingBagConfig) -> EmbeddingCollection:
        return self.collections[f"dim{table.embedding_dim}"]  # type: ignore[return-value]

    def _table_of(self, table: EmbeddingBagConfig) -> torch.nn.Module:
        """The module that looks up ``table``'s ids: its own, or the shared one."""
        return self.embedding_bags[table.name if table.name in self.embedding_bags else "shared"]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled vectors of every table's features, keyed as ``EmbeddingBagCollection`` keys them."""
        if is_fx_symbolic_tracing():  # torch.fx.symbolic_trace, torchrec.fx.symbolic_trace; not torch.export
            return self._traced_forward(features)
        vectors = self._one_id_per_row(features)
        if vectors is None:
            lookup = features.to_dict()
            pooled = []
            for table, pooling in zip(self._configs, self._poolings):
                for name in table.feature_names:
                    if name not in lookup:
                        raise KeyError(
                            f"the KeyedJaggedTensor has no feature {name!r} (table {table.name!r}); "
                            f"it has {features.keys()}"
                        )
                    bag = lookup[name]
                    weights = bag.weights() if self._is_weighted else None
                    pooled.append(
                        self._collection_of(table)
                        .pool(table.name, Bags(bag.values(), bag.offsets(), weights), pooling=pooling)
                        .float()
                    )
            vectors = torch.cat(pooled, dim=1)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_key, values=vectors)

    def _traced_forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``forward`` under fx tracing, as EmbeddingBagCollection's: per feature its values, offsets (and weights)
        into its table, which is one ``call_module`` node (a leaf: the tables' Python checks the data, which a
        trace cannot follow), then what ``EmbeddingCollection.pool`` does around the table."""
        lookup = features.to_dict()
        pooled = []
        for table, pooling in zip(self._configs, self._poolings):
            collection, module = self._collection_of(table), self._table_of(table)
            for name in table.feature_names:
                bag = lookup[name]
                values, offsets = bag.values(), bag.offsets()
                weights = bag.weights() if self._is_weighted else None
                if not isinstance(values, torch.fx.Proxy):
                    raise TypeError(
                        f"fx tracing: feature {name!r}'s values are {type(values).__name__}, not a "
                        f"traced value: trace with the KeyedJaggedTensor as an input"
                    )
                if collection.sharing == "shared":  # feature f's id x is offset_f + x in the one table
                    index = collection._index_of(table.name)
                    start = sum(f.num_embeddings for f in collection.features[:index])
                    # traced: the Proxy stands for the values' Tensor (the wrapped call becomes one node)
                    values = _shared_ids(cast(Tensor, values), table.num_embeddings, start, f"feature {table.name!r}")
                else:
                    values = values.long()
                tracer = values.tracer
                vectors = tracer.create_proxy(
                    "call_module",
                    tracer.path_of_module(module),
                    (values, offsets if module.include_last_offset else offsets[:-1], weights),
                    {},
                )
                if module.mode != pooling:  # as pool: the table's mode converted by the bag sizes
                    sizes = (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(vectors.dtype)
                    vectors = vectors / sizes if pooling == "mean" else vectors * sizes
                pooled.append(vectors.float())
        vectors = torch.cat(pooled, dim=1)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_key, values=vectors)

    def _one_id_per_row(self, features: KeyedJaggedTensor) -> Tensor | None:
        """The batched one-hot lookup when every row holds exactly one id of each feature, else None."""
        if not self._one_feature_per_table or features.variable_stride_per_key():
            return None
        batch, lengths = features.stride(), features.lengths()
        keys = tuple(features.keys())
        if lengths.numel() != batch * len(keys) or not bool((lengths == 1).all()):
            return None
        columns = self._columns.get(keys)
        if columns is None:
            where = {name: position for position, name in enumerate(keys)}
            missing = [t.feature_names[0] for t in self._configs if t.feature_names[0] not in where]
            if missing:
                raise KeyError(f"the KeyedJaggedTensor has no feature {missing[0]!r}; it has {list(keys)}")
            columns = self._columns[keys] = [
                torch.tensor([where[t.feature_names[0]] for t in self._configs if f"dim{t.embedding_dim}" == name])
                for name in self.collections
            ]
        # a KJT holds feature after feature: with one id per row its values are a (features, batch) matrix
        matrix = features.values().view(len(keys), batch)
        weights = features.weights().view(len(keys), batch) if self._is_weighted else None
        parts = []
        for collection, chosen in zip(self.collections.values(), columns):
            chosen = chosen.to(lengths.device)
            vectors = collection(matrix.index_select(0, chosen).t()).float()  # (batch, tables, dim): sum = mean
            if weights is not None:
                vectors = vectors * weights.index_select(0, chosen).t().unsqueeze(-1).to(vectors.dtype)
            parts.append(vectors)
        if len(parts) == 1:
            return parts[0].flatten(1)
        # tables in config order: each collection's columns go back to their tables' places
        by_table = {}
        for collection_parts, name in zip(parts, self.collections):
            members = [t for t in self._configs if f"dim{t.embedding_dim}" == name]
            by_table.update({t.name: collection_parts[:, j] for j, t in enumerate(members)})
        return torch.cat([by_table[t.name] for t in self._configs], dim=1)

    def __prepare_scriptable__(self) -> EmbeddingBagCollection:
        """``torch.jit.script``'s hook: with ``method="full"`` (per-feature, sum or mean tables) the module scripts
        as the EmbeddingBagCollection that holds its very parameters (same vectors; no id-range ValueError: an id
        out of range fails in nn.EmbeddingBag). torch puts the returned module in this one's place inside a model
        being scripted. Compressed tables cannot be scripted: TypeError, saying why."""
        reason = None
        if self._method != "full":
            reason = (
                f"its method {self._method!r} looks ids up in Python that TorchScript cannot compile "
                f"(hashing, id checks, custom autograd functions, compiled kernels)"
            )
        elif any(collection.sharing == "shared" for collection in self.collections.values()):
            reason = "its one shared table reads every feature's ids at an offset, which no EmbeddingBagCollection does"
        elif any(
            not isinstance(m, FullEmbedding) or m.padding_idx is not None or m.mode == "max"
            for m in self.embedding_bags.values()
        ):
            reason = "a full table with padding_idx or mode='max' is not an EmbeddingBagCollection's"
        if reason is not None:
            raise TypeError(
                f"torch.jit.script cannot script this CompressedEmbeddingBagCollection: {reason}. "
                f"torchrec.fx.symbolic_trace traces it (its tables as call_module nodes); torch.compile "
                f"compiles around its lookups"
            )
        scriptable = EmbeddingBagCollection(self._configs, is_weighted=self._is_weighted, device=torch.device("meta"))
        for name, table in self.embedding_bags.items():
            bag = scriptable.embedding_bags[name]
            bag.weight, bag.sparse = table.weight, table.sparse  # its parameters are this module's
        scriptable._device = self.device
        return scriptable

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The table configs it was built from."""
        return self._configs

    def is_weighted(self) -> bool:
        """Whether the input KJTs carry per-id weights."""
        return self._is_weighted

    def on_train_begin(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Tell the adaptive tables the run's length (CCE's clustering schedule is derived from it)."""
        for module in self.modules():
            if isinstance(module, CompressedEmbedding):
                module.on_train_begin(total_steps, steps_per_epoch)

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after every optimizer step: CAFE's and CCE's sketches and clustering run here, as in compemb's
        Trainer (``optimizer`` lets a table reset the optimizer state of rows it gives to new ids). A module traced
        from this one shares its tables: call this one's ``on_step_end`` when training the traced one."""
        tables = [module for module in self.modules() if isinstance(module, CompressedEmbedding)]
        # under a process group every table's recorded importance in one collective; tables that update together
        # (per-feature CAFE on a device) at once
        batches = [
            batch
            for collection in self.collections.values()
            for batch in cast(EmbeddingCollection, collection).table_batches()  # (a ModuleDict types it Module)
        ]
        end_step(tables, step, optimizer, batches)

    @property
    def device(self) -> torch.device:
        """The device the tables are on."""
        return next(self.parameters()).device
