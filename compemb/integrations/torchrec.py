"""compemb's compressed tables behind TorchRec's ``EmbeddingBagCollectionInterface``.

``CompressedEmbeddingBagCollection`` takes the ``EmbeddingBagConfig`` list an ``EmbeddingBagCollection`` would,
reads a ``KeyedJaggedTensor`` and returns the ``KeyedTensor`` of pooled vectors that one would, so it drops into
TorchRec models (``torchrec.models.dlrm.DLRM``'s ``embedding_bag_collection=``) and training loops unchanged. Its
tables are one :class:`compemb.collection.EmbeddingCollection` (one table per config, one budget for all), so
the vectors equal compemb's own collection's for the same ids and seed.

Under ``DistributedModelParallel`` it has no sharder (compressed tables are small), so DMP replicates it with
DistributedDataParallel like any dense module; the adaptive methods (CAFE, CCE) gather what changes their state
across the process group themselves (:mod:`compemb.distributed`), so every replica stays the same.

Needs the ``torchrec`` extra (``pip install 'compemb[torchrec]'``; see the README for the ``--no-deps`` step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
except ImportError as error:  # one line that says what to install
    raise ImportError(
        "compemb.integrations.torchrec needs TorchRec: pip install 'compemb[torchrec]' (torchrec==1.9.2 and "
        "fbgemm-gpu-cpu==1.8.0 with --no-deps; `make torchrec` does it)"
    ) from error

from compemb.collection import Bags, EmbeddingCollection, Feature
from compemb.embeddings.adaptive import end_step
from compemb.embeddings.base import CompressedEmbedding

_POOLINGS = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}
_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}


def _table_prefixes(module: CompressedEmbeddingBagCollection) -> dict[str, str]:
    """``collections.dimD.embeddings.<table>.`` -> ``embedding_bags.<table>.`` for every table module."""
    return {f"collections.{group}.embeddings.{name}.": f"embedding_bags.{name}."
            for group, collection in module.collections.items() for name in collection.embeddings}


def _as_ebc_keys(module: CompressedEmbeddingBagCollection, state: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: the tables' entries under EmbeddingBagCollection's names, in its order (the configs')."""
    renamed: dict[str, list[tuple[str, Any]]] = {}
    for ours, theirs in _table_prefixes(module).items():
        for key in [k for k in state if k.startswith(prefix + ours)]:
            renamed.setdefault(theirs, []).append((prefix + theirs + key[len(prefix + ours):], state.pop(key)))
    order = [f"embedding_bags.{t.name}." for t in module._configs] + ["embedding_bags.shared."]
    for theirs in sorted(renamed, key=lambda name: order.index(name) if name in order else len(order)):
        state.update(renamed[theirs])


def _from_ebc_keys(module: CompressedEmbeddingBagCollection, state: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: EmbeddingBagCollection's names (this module's own, or an EBC's) back to ours."""
    for ours, theirs in _table_prefixes(module).items():
        for key in [k for k in state if k.startswith(prefix + theirs)]:
            state[prefix + ours + key[len(prefix + theirs):]] = state.pop(key)


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A drop-in ``EmbeddingBagCollection`` whose tables are compressed by ``method``.

    Args:
        tables: TorchRec's table configs (one table each; a table may serve several features, as in TorchRec).
            Pooling SUM or MEAN; ``embedding_dim`` may differ between tables (the tables of one dim are one
            compemb collection) and ``data_type`` FP32, FP16 or BF16 is the dtype the table stores (outputs are
            float32, as EmbeddingBagCollection's).
        method: a compemb method name (``compemb.METHODS``), e.g. ``"cce"``, ``"cafe"``, ``"hash"``.
        compression, num_params: the budget for all tables together (one of the two; neither for ``"full"``).
        sharing: ``"per_feature"`` (a table per config) or ``"shared"`` (one table over every config's ids).
        is_weighted: the input KJTs carry per-id weights (sum pooling only).
        seed: table i is built with ``seed + i``.
        options: passed to every compressed table (``sparse=True``, ``columns=4``, ...).

    ``state_dict`` keys are EmbeddingBagCollection's (``embedding_bags.<table>.<name>``), so a checkpoint of an
    EmbeddingBagCollection loads into ``method="full"``.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> tables = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=1000, feature_names=["f1"]),
        ...           EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=500, feature_names=["f2"])]
        >>> ebc = CompressedEmbeddingBagCollection(tables, "hash", compression=10)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f1", "f2"], torch.tensor([1, 2, 3, 4]), torch.tensor([1, 1, 2, 0]))
        >>> pooled = ebc(kjt)
        >>> pooled.values().shape, pooled.keys()
        (torch.Size([2, 16]), ['f1', 'f2'])
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        method: str,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        sharing: str = "per_feature",
        is_weighted: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("CompressedEmbeddingBagCollection needs at least one table config")
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
        self._configs = tables
        self._is_weighted = is_weighted
        self._poolings = [_POOLINGS[table.pooling] for table in tables]
        # the tables of one dim are one compemb collection (its features are the tables, one-hot from its view,
        # pooled here by each table's pooling); a budget in params is shared out by the full tables' sizes
        full = {dim: sum(t.num_embeddings * dim for t in tables if t.embedding_dim == dim) for dim in dims}
        collections = {}
        for group, dim in enumerate(dims):
            members = [t for t in tables if t.embedding_dim == dim]
            share = None if num_params is None else max(1, round(num_params * full[dim] / sum(full.values())))
            collections[f"dim{dim}"] = EmbeddingCollection(
                [Feature(table.name, table.num_embeddings) for table in members], dim, method,
                compression=compression, num_params=share, seed=seed + tables.index(members[0]), device=device,
                sharing=sharing, **options)
        self.collections = torch.nn.ModuleDict(collections)
        for table in tables:  # each table stores its config's data type
            dtype = _DTYPES[table.data_type]
            if dtype != torch.float32:
                for module in self._tables_of(table):
                    module.to(dtype)
        self._embedding_names = [name for names in get_embedding_names_by_table(tables) for name in names]
        self._lengths_per_key = [table.embedding_dim for table in tables for _ in table.feature_names]
        # one feature per table: a KJT of one id per row can go through each collection's batched one-hot lookup
        self._one_feature_per_table = all(len(table.feature_names) == 1 for table in tables)
        self._columns: dict[tuple[str, ...], list[Tensor]] = {}
        self._register_state_dict_hook(_as_ebc_keys)
        self._register_load_state_dict_pre_hook(_from_ebc_keys, with_module=True)

    @property
    def collection(self) -> EmbeddingCollection:
        """The compemb collection of the tables (where every table has one embedding_dim)."""
        if len(self.collections) != 1:
            raise AttributeError(f"the tables have {len(self.collections)} embedding dims, one collection each: "
                                 f"see .collections")
        return next(iter(self.collections.values()))  # type: ignore[return-value]

    def _collection_of(self, table: EmbeddingBagConfig) -> EmbeddingCollection:
        return self.collections[f"dim{table.embedding_dim}"]  # type: ignore[return-value]

    def _tables_of(self, table: EmbeddingBagConfig) -> list[torch.nn.Module]:
        embeddings = self._collection_of(table).embeddings
        return [embeddings[table.name if table.name in embeddings else "shared"]]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled vectors of every table's features, keyed as ``EmbeddingBagCollection`` keys them."""
        vectors = self._one_id_per_row(features)
        if vectors is None:
            lookup = features.to_dict()
            pooled = []
            for table, pooling in zip(self._configs, self._poolings):
                for name in table.feature_names:
                    if name not in lookup:
                        raise KeyError(f"the KeyedJaggedTensor has no feature {name!r} (table {table.name!r}); "
                                       f"it has {features.keys()}")
                    bag = lookup[name]
                    weights = bag.weights() if self._is_weighted else None
                    pooled.append(self._collection_of(table).pool(
                        table.name, Bags(bag.values(), bag.offsets(), weights), pooling=pooling).float())
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
                for name in self.collections]
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
        Trainer (``optimizer`` lets a table reset the optimizer state of rows it gives to new ids)."""
        tables = [module for module in self.modules() if isinstance(module, CompressedEmbedding)]
        # under a process group every table's recorded importance in one collective; tables that update together
        # (per-feature CAFE on a device) at once
        batches = [batch for collection in self.collections.values() for batch in collection.table_batches()]
        end_step(tables, step, optimizer, batches)

    @property
    def device(self) -> torch.device:
        """The device the tables are on."""
        return next(self.parameters()).device
