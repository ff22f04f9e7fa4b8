"""Table-batched lookups: one gather over many features' tables, as TorchRec's table-batched embeddings do.

A per-feature collection of Criteo's 26 features would otherwise make 26 lookups per step, each a handful of
small kernels with Python around them; for the hash family that overhead is most of the step. A method that can
(``CompressedEmbedding.table_batch``) computes every feature's row indices in one vectorised pass and reads them
with one ``index_select`` over its tables' weights, kept side by side in one buffer.

The tables stay what they are: every weight is still its table's own ``Parameter`` (``state_dict``, optimizers,
export and quantization see no difference); only its storage is a slice of the shared buffer (:class:`PackedWeights`).
Whatever moves a weight out of the buffer (``.to(device)``, ``param.data = ...``, a deep copy) is noticed on the
next lookup, which packs the weights again; in-place updates (optimizer steps, ``load_state_dict``) keep them packed.
The backward pass hands each weight its own gradient (sparse or dense, as the table's ``sparse``), so the
optimizer's work and state are exactly those of the per-table lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from compemb.checks import assert_ids_in_range
from compemb.hashing import UniversalHash, hash_high32, hash_signs
from compemb.kernels import device_path


class Table(Protocol):
    """What a batch reads of each of its tables: a :class:`~compemb.embeddings.base.CompressedEmbedding`, named by
    what it offers (this module imports nothing from compemb.embeddings, which imports it)."""

    @property
    def sparse(self) -> bool: ...
    @property
    def name(self) -> str | None: ...
    @property
    def method_name(self) -> str: ...
    @property
    def num_embeddings(self) -> int | None: ...
    def _who(self) -> str: ...
    def __call__(self, ids: Tensor, /) -> Tensor: ...


class TableBatch(Protocol):
    """Every feature's vectors from several tables of one method in one pass."""

    def __call__(self, ids: Tensor) -> Tensor:
        """``(batch, tables)`` int64 ids, column j for table j -> ``(batch, tables, embedding_dim)``."""
        ...


class PackedWeights:
    """Weights of one row width whose storage is one contiguous buffer, in order, so one gather reads any row.

    The weights are read from their modules on every lookup (``getattr(module, name)``), so a parameter
    replaced in its module (``load_state_dict(assign=True)``) is the one packed and trained.

    Args:
        modules: the tables, in the order their weights are packed (a module twice for two of its weights).
        name: the attribute that holds each table's weight (``"weight"``, ``"remainder"``, ...), or one per module
            (QR's remainders and quotients in one buffer: ``[q1, q2, q1, q2]``, ``["remainder"] * 2 + ["quotient"] * 2``).
        sparse: whether each weight's gradient is a sparse COO tensor (as ``F.embedding(sparse=True)`` gives).

    Example::

        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)  # weights (2, 3) and (4, 3)
        >>> pack = PackedWeights([a, b], "weight")
        >>> pack.row_offsets.tolist()
        [0, 2]
        >>> rows = torch.tensor([[[1], [3]]])  # (batch, weights, k): a's row 1, b's row 3
        >>> torch.equal(pack.gather(rows + pack.row_offsets.view(1, -1, 1))[0, 1, 0], b.weight[3])
        True
    """

    def __init__(self, modules: Sequence[object], name: str | Sequence[str], sparse: bool = False) -> None:
        if not modules:
            raise ValueError("PackedWeights needs at least one weight")
        self.modules = list(modules)
        self.names = [name] * len(self.modules) if isinstance(name, str) else list(name)
        if len(self.names) != len(self.modules):
            raise ValueError(f"PackedWeights: {len(self.names)} names for {len(self.modules)} modules")
        weights = self.weights
        first = weights[0]
        for weight in weights:
            if weight.dim() != 2 or weight.shape[1] != first.shape[1]:
                raise ValueError(
                    f"packed weights must be 2-D of one row width, got {[tuple(w.shape) for w in weights]}"
                )
            if weight.dtype != first.dtype or weight.device != first.device:
                raise ValueError("packed weights must share one dtype and device")
        self.sparse = sparse
        self.num_rows = [int(w.shape[0]) for w in weights]
        starts = [0]
        for rows in self.num_rows[:-1]:
            starts.append(starts[-1] + rows)
        self.starts = starts
        self.row_offsets = torch.tensor(starts, dtype=torch.int64, device=first.device)
        self.buffer = first.new_empty(0)
        self.pack()

    @property
    def weights(self) -> list[torch.nn.Parameter]:
        """The modules' current weights."""
        return [getattr(module, name) for module, name in zip(self.modules, self.names)]

    @torch.no_grad()
    def pack(self) -> None:
        """Copy the weights into one new buffer and make each weight's data its slice of it."""
        weights = self.weights
        first = weights[0]
        buffer = torch.empty(sum(self.num_rows), first.shape[1], dtype=first.dtype, device=first.device)
        for weight, start, rows in zip(weights, self.starts, self.num_rows):
            buffer[start : start + rows].copy_(weight)
            weight.data = buffer[start : start + rows]
        self.buffer = buffer
        if self.row_offsets.device != first.device:
            self.row_offsets = self.row_offsets.to(first.device)

    def is_packed(self, weights: Sequence[Tensor]) -> bool:
        """Whether every one of ``weights`` still lies at its place in the buffer."""
        base, row_bytes = self.buffer.data_ptr(), self.buffer.shape[1] * self.buffer.element_size()
        buffer_storage = self.buffer.untyped_storage().data_ptr()
        for weight, start in zip(weights, self.starts):
            if weight.data_ptr() != base + start * row_bytes or weight.untyped_storage().data_ptr() != buffer_storage:
                return False
        return True

    def gather(self, rows: Tensor) -> Tensor:
        """Rows of the buffer: ``rows`` ``(batch, weights, k)``, where ``rows[:, j]`` lies in weight j's range
        (its start in ``row_offsets`` added) -> ``(batch, weights, k, row_dim)``, differentiable to every weight."""
        weights = self.ensure_packed()
        return _GatherPacked.apply(self.buffer, rows, self, *weights)

    def ensure_packed(self) -> list[torch.nn.Parameter]:
        """The weights, packed again first if anything moved or replaced one since the last lookup."""
        weights = self.weights
        if not self.is_packed(weights):
            self.pack()
            weights = self.weights
        return weights


class PackedBuffers:
    """One buffer of several modules (one trailing shape, dtype and device), each module's tensor a slice of one
    flat tensor, in order, so one op reads or writes every module's rows; ``padding`` rows past the last module's
    (zeros) give fixed-shape writes a place to send the slots they do not use.

    The modules keep their buffers (``state_dict``, ``load_state_dict`` in place and queries see no difference);
    whatever replaces one (``.to(device)``, an assigning load) is noticed by :meth:`flat`, which packs them again.

    Example::

        >>> a, b = torch.nn.Module(), torch.nn.Module()
        >>> a.register_buffer("seen", torch.zeros(2)); b.register_buffer("seen", torch.zeros(3))
        >>> packed = PackedBuffers([a, b], "seen", padding=1)
        >>> packed.flat().index_fill_(0, torch.tensor([1, 2, 5]), 1.0)  # a's row 1, b's row 0, the padding row
        tensor([0., 1., 1., 0., 0., 1.])
        >>> a.seen.tolist(), b.seen.tolist()
        ([0.0, 1.0], [1.0, 0.0, 0.0])
    """

    def __init__(self, modules: Sequence[torch.nn.Module], name: str, padding: int = 0) -> None:
        if not modules:
            raise ValueError("PackedBuffers needs at least one module")
        self.modules, self.name, self.padding = list(modules), name, int(padding)
        self.num_rows: list[int] = []
        self.starts: list[int] = []  # where each module's rows begin in the flat tensor
        self.buffer = torch.empty(0)
        self.pack()

    def pack(self) -> None:
        """Copy the modules' buffers into one new flat tensor and make each module's buffer its slice of it."""
        tensors: list[Tensor] = [module._buffers[self.name] for module in self.modules]  # type: ignore[misc]
        first = tensors[0]
        if any(t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.device != first.device for t in tensors):
            raise ValueError(f"packed buffers {self.name!r} must share a trailing shape, dtype and device")
        self.num_rows = [int(t.shape[0]) for t in tensors]
        self.starts = [sum(self.num_rows[:i]) for i in range(len(tensors))]
        padding = first.new_zeros((self.padding, *first.shape[1:]))
        self.buffer = torch.cat([*tensors, padding])
        for module, start, rows in zip(self.modules, self.starts, self.num_rows):
            module._buffers[self.name] = self.buffer[start : start + rows]

    def is_packed(self) -> bool:
        """Whether every module's buffer still lies at its place in the flat tensor."""
        flat = self.buffer
        row = flat[0].numel() * flat.element_size() if flat.numel() else 0
        for module, start in zip(self.modules, self.starts):
            tensor = module._buffers[self.name]
            if tensor is None or tensor.device != flat.device:
                return False
            if tensor.numel() == 0:  # an empty slice holds nothing to keep in place (its pointer is arbitrary)
                continue
            if (
                tensor.data_ptr() != flat.data_ptr() + start * row
                or tensor.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
            ):
                return False
        return True

    def flat(self) -> Tensor:
        """The flat tensor (padding rows last), packed again first if any module's buffer moved or was replaced."""
        if not self.is_packed():
            self.pack()
        return self.buffer


class SeparateLookups:
    """Tables looked up one at a time, each by its own lookup (adaptive bookkeeping and hooks included), with their
    weights packed side by side: a row-wise optimizer (:class:`compemb.optim.RowAdam`) then updates all of them in
    one pass. For methods whose lookup is a compiled kernel of their own (CCE, CAFE).

    Args:
        tables: the tables, in column order.
        names: the attributes holding the weights to pack (one buffer per name).
    """

    def __init__(self, tables: Sequence[Table], names: Sequence[str]) -> None:
        self.tables = list(tables)
        self.packs = [PackedWeights(self.tables, name, sparse=tables[0].sparse) for name in names]

    def __call__(self, ids: Tensor) -> Tensor:
        for pack in self.packs:
            pack.ensure_packed()
        return torch.stack([table(ids[:, column]) for column, table in enumerate(self.tables)], dim=1)


class RowsBatch:
    """Tables that each read one row of their ``weight`` per id, found by the table's own rule (``rows_of(ids)``:
    an id map with a hashed fallback, say), and full tables (the row is the id): every column's rows found, then
    one gather over the packed weights, and, the weights in one buffer, one optimizer update for all of them.
    Needs every vocabulary closed (one range rule for the batch)."""

    def __init__(self, tables: Sequence[Table]) -> None:
        self.tables = list(tables)
        self.pack = PackedWeights(self.tables, "weight", sparse=self.tables[0].sparse)
        self.ranges = IdRanges(self.tables)
        self.rules = [getattr(t, "rows_of", None) for t in self.tables]  # None: a full table's row is the id

    @staticmethod
    def accepts(tables: Sequence[Table]) -> bool:
        """Whether a RowsBatch can take ``tables``: closed vocabularies, one row width."""
        weights = [getattr(t, "weight", None) for t in tables]  # each reads rows of its weight
        return (
            all(getattr(t, "num_embeddings", None) is not None for t in tables)
            and all(isinstance(w, Tensor) for w in weights)
            and len({w.shape[1] for w in weights if isinstance(w, Tensor)}) == 1
        )

    def __call__(self, ids: Tensor) -> Tensor:
        self.ranges.check(ids)
        columns = ids.t().contiguous()  # each table's ids contiguous once (a rule's search wants them so)
        rows = torch.stack([columns[j] if rule is None else rule(columns[j]) for j, rule in enumerate(self.rules)], 1)
        return self.pack.gather((rows + self.pack.row_offsets).unsqueeze(-1)).squeeze(-2)


class _GatherPacked(torch.autograd.Function):
    """``buffer[rows]`` whose backward returns each packed weight its own gradient."""

    @staticmethod
    def forward(ctx, buffer: Tensor, rows: Tensor, pack: PackedWeights, *weights: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.pack = pack
        return buffer.index_select(0, rows.reshape(-1)).view(*rows.shape, buffer.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rows,) = ctx.saved_tensors
        pack: PackedWeights = ctx.pack
        row_dim = grad.shape[-1]
        if not pack.sparse:  # one scatter into a buffer-shaped gradient; each weight's gradient is its slice
            flat = grad.new_zeros(sum(pack.num_rows), row_dim)
            flat.index_add_(0, rows.reshape(-1), grad.reshape(-1, row_dim))
            grads = [flat[start : start + size] for start, size in zip(pack.starts, pack.num_rows)]
            return (None, None, None, *grads)
        # weight-major once, so each weight's rows and gradients are one contiguous slice
        local = (rows - pack.row_offsets.view(1, -1, 1)).transpose(0, 1).reshape(len(pack.num_rows), -1)
        values = grad.transpose(0, 1).reshape(len(pack.num_rows), -1, row_dim)
        sparse_grads = [
            torch.sparse_coo_tensor(local[j : j + 1], values[j], (size, row_dim), check_invariants=False)
            for j, size in enumerate(pack.num_rows)
        ]
        return (None, None, None, *sparse_grads)


def hash_columns(ids: Tensor, hashes: Sequence[UniversalHash], buckets: Tensor) -> Tensor:
    """Every table's hashes of its column of ids in one pass: ``ids`` ``(batch, tables)``, ``hashes[j]`` table j's
    :class:`~compemb.hashing.UniversalHash` (k functions each), ``buckets`` ``(tables, 1)`` their ranges ->
    ``(batch, tables, k)``, exactly ``hashes[j](ids[:, j])`` in column j (the coefficients are read afresh, so a
    redrawn hash is seen)."""
    return hash_high32(ids, _stacked(hashes)).mul_(buckets).bitwise_right_shift_(32)


def sign_columns(ids: Tensor, hashes: Sequence[UniversalHash], dtype: torch.dtype) -> Tensor:
    """Every table's hashed signs of its column of ids, as ``hashes[j].signs(ids[:, j])``: ``(batch, tables, k)``."""
    return hash_signs(ids, _stacked(hashes), dtype)


def _stacked(hashes: Sequence[UniversalHash]) -> Tensor:
    return torch.stack([h.coefficients for h in hashes])  # (tables, k, 2)


def column_sizes(values: Sequence[int], device: torch.device) -> Tensor:
    """Per-table sizes as a ``(tables, 1)`` int64 tensor, to broadcast against ``(batch, tables, k)``."""
    return torch.tensor(list(values), dtype=torch.int64, device=device).view(-1, 1)


def check_id_ranges(tables: Sequence[Table], ids: Tensor, sizes: Tensor) -> None:
    """Raise the table's own ValueError when an id of column j is outside ``[0, sizes[j])`` (closed vocabularies:
    a wrapped or shifted id would silently read another table's rows)."""
    if device_path(ids):  # no host round trip per lookup: a device-side assert
        names = [t.name or str(position) for position, t in enumerate(tables)]
        assert_ids_in_range(
            ids, sizes, f"a table batch of {len(tables)} {tables[0].method_name} tables ({', '.join(names)})"
        )
        return
    bad = (ids < 0) | (ids >= sizes)
    if bool(bad.any()):
        row, column = (int(v) for v in bad.nonzero()[0])
        table = tables[column]
        raise ValueError(f"{table._who()}: id {int(ids[row, column])} is outside [0, {table.num_embeddings})")


class IdRanges:
    """A table batch's range rule: ids of column j must lie in ``[0, num_embeddings_j)`` when every table has a
    closed vocabulary (``num_embeddings`` given), as each table's own lookup requires; nothing with an open one."""

    def __init__(self, tables: Sequence[Table]) -> None:
        self.tables = list(tables)
        closed = all(getattr(t, "num_embeddings", None) is not None for t in self.tables)
        self.sizes = torch.tensor([t.num_embeddings for t in self.tables]) if closed else None

    def check(self, ids: Tensor) -> None:
        """Raise the column's table's ValueError for an id outside its range (a device-side assert on a device)."""
        if self.sizes is None or ids.numel() == 0:
            return
        if self.sizes.device != ids.device:
            self.sizes = self.sizes.to(ids.device)
        check_id_ranges(self.tables, ids, self.sizes)
