"""Post-training quantization of any trained method's tables: int8 / int4 row-wise and product quantization.

:func:`quantize` returns a deep copy, in eval mode, in which the module itself, if it is a CompressedEmbedding, or
else every outermost CompressedEmbedding inside it (each table of an EmbeddingCollection in a DLRM, say) is wrapped
in a :class:`QuantizedEmbedding`. A method's *tables* are its floating-point 2-D parameters with at least 2 rows
(rows = dim 0: ids, hashed rows, CCE's columns, TT cores, DHE's Linear weights by output unit). They leave the
wrapped module as persistent buffers here, so ``state_dict()`` and ``memory()`` count them once, quantized; other
parameters (biases) stay fp32, frozen. What each scheme stores for an n x d table:

- ``"int8"``: per row an fp16 scale = (max - min) / 255 and an fp16 bias = min (as TorchRec/FBGEMM inference tables
  store them) and uint8 codes ``round((x - bias) / scale)``: n*d + 4n bytes, (d + 4) / (4d) of fp32 (0.3125 at
  d=16). The bias is rounded down and the scale up to fp16, so every value lies in [bias, bias + 255 scale] and is
  read back within scale / 2. A constant row gets scale 0: exact whenever its value is an fp16.
- ``"int4"``: the same with 15 steps, two codes per byte (low nibble first; odd widths padded): n*ceil(d/2) + 4n.
- Rows narrower than 8 (ROBE's flat arrays, CCE's sub-columns) would cost more in scale and bias than in codes:
  ceil(8 / d) consecutive rows share a pair. A table no smaller quantized (a handful of rows) stays fp32, as counted.
- ``"pq"``: product quantization (Jégou, Douze & Schmid, "Product quantization for nearest neighbor search", 2011):
  the columns split into m contiguous subspaces of widths as equal as possible; per subspace k = ``centroids``
  centroids by k-means (:func:`compemb.cluster.kmeans`, exact Lloyd's over faiss, 25 iterations, on a seeded sample
  of at most 256 k rows), every row coded by its nearest. Codes uint8 (n, m) and one fp32 codebook (k, d), subspace
  j's centroids in its columns: n*m + 4kd bytes. m is ``subspaces=``; or, given ``compression=R``, the m whose bytes
  are nearest the fp32 bytes / R (sizes move in steps of n bytes: the nearest, not always within 1%; BudgetError
  if R is beyond what m = 1 to d reach, give or take 1%); else ceil(d / 4). A table of fewer than 2k rows gains
  nothing from k centroids: it is stored int8 (:meth:`QuantizedEmbedding.spec` says so).

Lookups: a wrapped FullEmbedding dequantizes the requested rows only. Other methods run their own lookups on fp32
copies of their tables, made by the first lookup in non-persistent buffers under the tables' names and dropped by
``load_state_dict``: that generic path holds fp32 tables at run time, while ``memory()`` reports what is stored.
Training is not supported: no table is trainable and the wrapped module always runs in eval mode (adaptive updates
off); the dense layers of a model around it can still be trained.

Example::

    >>> import compemb
    >>> q = compemb.quantize(compemb.FullEmbedding(1000, 16), "int8")
    >>> q.memory().total  # 1000 * (16 codes + 2 scale + 2 bias bytes)
    20000
    >>> q(torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 16])
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import BUDGET_TOLERANCE, FLOAT_BYTES, BudgetError, MemoryReport
from compemb.cluster import assign, kmeans
from compemb.embeddings.base import CompressedEmbedding
from compemb.embeddings.full import FullEmbedding

SCHEMES = ("int8", "int4", "pq")
LEVELS = {"int8": 255, "int4": 15}  # steps between a row's min and max
GROUP_VALUES = 8  # rows narrower than this share a scale and bias with their neighbours
PQ_WIDTH = 4  # default sub-vector width
PQ_NITER = 25  # Lloyd iterations per subspace (faiss's default)
FP16_MAX = 65504.0

_Module = TypeVar("_Module", bound=torch.nn.Module)
# the dtypes a quantized table may come back in, by the name its spec gives (a fixed table: a spec's string is
# never looked up on the torch module)
TABLE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
MAX_ROWS = 1 << 62


def check_table_spec(spec: Mapping[str, Any]) -> None:
    """ValueError naming the field where one table's spec is not one :func:`quantize` writes: a known scheme and
    dtype, positive integer rows and cols, group rows in 1..rows (int8/int4), or PQ widths of positive integers
    summing to cols and 1..256 centroids (a code is one byte)."""

    def positive_int(name: str, value: Any, high: int = MAX_ROWS) -> int:
        if type(value) is not int or not 1 <= value <= high:
            raise ValueError(f"quantized table spec: {name} must be an integer in [1, {high:,}], got {value!r}")
        return value

    if not isinstance(spec, Mapping):
        raise ValueError(f"quantized table spec must be an object, got {type(spec).__name__}")
    if spec.get("scheme") not in SCHEMES:
        raise ValueError(f"quantized table spec: scheme must be one of {SCHEMES}, got {spec.get('scheme')!r}")
    if spec.get("dtype") not in TABLE_DTYPES:
        raise ValueError(f"quantized table spec: dtype must be one of {tuple(TABLE_DTYPES)}, got {spec.get('dtype')!r}")
    rows, cols = positive_int("rows", spec.get("rows")), positive_int("cols", spec.get("cols"), 1 << 20)
    if spec["scheme"] != "pq":
        positive_int("group_rows", spec.get("group_rows"), rows)
        return
    widths = spec.get("widths")
    if not isinstance(widths, list) or not widths or len(widths) > cols:
        raise ValueError(f"quantized table spec: widths must be a list of 1..{cols} integers, got {widths!r}")
    if sum(positive_int("each of widths", width, cols) for width in widths) != cols:
        raise ValueError(f"quantized table spec: widths {widths} do not sum to cols {cols}")
    positive_int("centroids", spec.get("centroids"), 256)


class _QuantizedTable(torch.nn.Module):
    """One table's quantized storage (persistent buffers), built empty from its spec; ``fit`` fills it."""

    codes: Tensor
    codebook: Tensor  # pq
    column_subspace: Tensor  # pq
    scale: Tensor  # int8, int4
    bias: Tensor  # int8, int4

    def __init__(self, spec: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        super().__init__()
        check_table_spec(spec)  # before anything is sized from it (a spec may come from a file)
        self.spec = dict(spec)
        self.scheme, self.rows, self.cols = spec["scheme"], int(spec["rows"]), int(spec["cols"])
        self.dtype = TABLE_DTYPES[spec["dtype"]]
        u8 = {"dtype": torch.uint8, "device": device}
        if self.scheme == "pq":
            widths = torch.tensor([int(w) for w in spec["widths"]])
            self.register_buffer("codes", torch.empty(self.rows, len(widths), **u8))  # type: ignore[arg-type]  # mixed **kwargs
            self.register_buffer("codebook", torch.empty(int(spec["centroids"]), self.cols, device=device))
            # each column's subspace, to read all of a row's centroids in one gather
            column_subspace = torch.repeat_interleave(torch.arange(len(widths)), widths)
            self.register_buffer("column_subspace", column_subspace.to(device), persistent=False)
            return
        self.group_rows = int(spec["group_rows"])
        groups, width = -(-self.rows // self.group_rows), self.group_rows * self.cols
        self.register_buffer("codes", torch.empty(groups, width if self.scheme == "int8" else -(-width // 2), **u8))  # type: ignore[arg-type]  # mixed **kwargs
        self.register_buffer("scale", torch.empty(groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(groups, dtype=torch.float16, device=device))

    @torch.no_grad()
    def fit(self, table: Tensor, seed: int) -> None:
        """Quantize ``table`` (rows, cols) into the buffers."""
        x = table.detach().float()
        if self.scheme == "pq":
            x, start, labels, codebook = x.cpu(), 0, [], torch.empty(self.codebook.shape)
            for width in self.spec["widths"]:
                part = x[:, start : start + width]
                centroids = kmeans(part, self.codebook.shape[0], niter=PQ_NITER, seed=seed, search="flat").centroids
                codebook[:, start : start + width] = centroids
                labels.append(assign(part, centroids)[0])
                start += width
            self.codes.copy_(torch.stack(labels, 1))
            self.codebook.copy_(codebook)
            return
        levels, groups = LEVELS[self.scheme], self.codes.shape[0]
        # padding rows repeat the last row: they change no group's min or max
        x = torch.cat([x, x[-1:].expand(groups * self.group_rows - self.rows, -1)]).reshape(groups, -1)
        low, high = x.amin(1), x.amax(1)
        bias = _round_fp16(low, down=True)
        scale = _round_fp16((high - bias.float()) / levels, down=False)
        s, b = scale.float().unsqueeze(1), bias.float().unsqueeze(1)
        codes = torch.where(s > 0, ((x - b) / s).round(), 0).clamp_(0, levels).to(torch.uint8)
        if self.scheme == "int4":
            codes = F.pad(codes, (0, codes.shape[1] % 2))
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        self.codes.copy_(codes)
        self.scale.copy_(scale)
        self.bias.copy_(bias)

    def lookup(self, rows: Tensor) -> Tensor:
        """Dequantized rows ``(N,)`` -> ``(N, cols)``, reading only their codes."""
        if self.scheme == "pq":  # each column from its subspace's centroid
            return self.codebook.gather(0, self.codes[rows].long()[:, self.column_subspace]).to(self.dtype)
        r = self.group_rows
        group = rows // r if r > 1 else rows
        codes = self.codes[group]
        if self.scheme == "int4":
            codes = torch.stack([codes & 15, codes >> 4], -1).flatten(1)[:, : r * self.cols]
        values = codes.float() * self.scale[group].float().unsqueeze(1) + self.bias[group].float().unsqueeze(1)
        if r > 1:  # the row inside its group
            within = (rows % r).view(-1, 1, 1).expand(-1, 1, self.cols)
            values = values.view(-1, r, self.cols).gather(1, within).squeeze(1)
        return values.to(self.dtype)

    def dequantize(self) -> Tensor:
        """The whole table, ``(rows, cols)`` in its original dtype."""
        return self.lookup(torch.arange(self.rows, device=self.codes.device))


class QuantizedEmbedding(CompressedEmbedding):
    """A trained method's module whose tables are stored quantized; built by :func:`quantize` or :meth:`from_spec`.

    Args:
        inner: the method's module. It is taken over: its tables leave it (as buffers here) and it stays in eval mode.
        spec: what to store, as :meth:`spec` returns it. The buffers start uninitialised until filled or loaded.

    Shape:
        as the wrapped method: ids ``(*)`` -> ``(*, embedding_dim)``; bags as nn.EmbeddingBag.
    """

    def __init__(self, inner: CompressedEmbedding, spec: Mapping[str, Any]) -> None:
        if not isinstance(inner, CompressedEmbedding) or isinstance(inner, QuantizedEmbedding):
            raise TypeError(f"inner must be a CompressedEmbedding that is not quantized already, got {type(inner)}")
        if spec.get("method", inner.method_name) != inner.method_name:
            raise ValueError(f"spec is for method {spec['method']!r}, not {inner.method_name!r}")
        # what the base class reads from class attributes follows the wrapped method
        self.method_name = f"{inner.method_name}+{spec['scheme']}"  # type: ignore[misc]  # per instance, on purpose
        self.open_vocabulary, self.stores_rows = inner.open_vocabulary, inner.stores_rows  # type: ignore[misc]  # as above
        super().__init__(inner.num_embeddings, inner.embedding_dim, mode=inner.mode, name=inner.name, init=inner.init)
        self.scheme, self._cached = spec["scheme"], False
        self._sketch_bytes = inner.memory().sketch_bytes  # as the method reports it, before its tables leave
        self._spec = {"scheme": self.scheme, "method": inner.method_name, "tables": copy.deepcopy(dict(spec["tables"]))}
        parameters = dict(inner.named_parameters())
        for name, table in spec["tables"].items():  # all checked before any table leaves the module
            param, shape = parameters.get(name), (table["rows"], table["cols"])
            if param is None or tuple(param.shape) != shape or table["scheme"] not in SCHEMES:
                found = "none" if param is None else f"shape {tuple(param.shape)}"
                raise ValueError(
                    f"{self._who()}: spec table {name!r} ({table['scheme']} {shape}) does not match the "
                    f"module's ({found})"
                )
        self._dtype = next(iter(parameters.values())).dtype if parameters else torch.float32  # for bag weights
        self.inner, self.tables = inner.eval(), torch.nn.ModuleDict()
        for name, table in spec["tables"].items():
            owner, _, leaf = name.rpartition(".")
            module = inner.get_submodule(owner)
            del module._parameters[leaf]
            module.register_buffer(leaf, None, persistent=False)  # the generic path's fp32 copy, made when needed
            self.tables[_key(name)] = _QuantizedTable(table, parameters[name].device)
        for param in inner.parameters():
            param.requires_grad_(False)
        self._fast = type(inner) is FullEmbedding and "weight" in self.tables

    @classmethod
    def from_spec(cls, inner: CompressedEmbedding, spec: Mapping[str, Any]) -> QuantizedEmbedding:
        """An empty QuantizedEmbedding of ``spec``'s shapes around a freshly built ``inner``, to ``load_state_dict``."""
        return cls(inner, spec)

    def spec(self) -> dict[str, Any]:
        """JSON-able: the scheme, the method, and per table its rows, cols, dtype and sizes (group rows or PQ's)."""
        return copy.deepcopy(self._spec)

    def dequantize(self) -> dict[str, Tensor]:
        """Every quantized table back in its dtype (fp32), by the wrapped module's parameter name."""
        return {name: self._table(name).dequantize() for name in self._spec["tables"]}

    def _table(self, name: str) -> _QuantizedTable:
        """The quantized storage of the wrapped module's parameter ``name``."""
        return cast(_QuantizedTable, self.tables[_key(name)])

    def lookup(self, ids: Tensor) -> Tensor:
        if self._fast:
            return self._table("weight").lookup(ids)
        self._put_tables(fp32=True)
        return self.inner.lookup(ids)

    def lookup_bags(
        self, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, one_id_per_bag: bool = False
    ) -> Tensor:
        if self._fast:  # the requested rows, reduced by embedding_bag over their positions
            return super().lookup_bags(ids, offsets, per_sample_weights, one_id_per_bag)
        self._put_tables(fp32=True)
        return self.inner.lookup_bags(ids, offsets, per_sample_weights, one_id_per_bag)

    def _put_tables(self, fp32: bool) -> None:
        """Put the dequantized tables (or None) where the wrapped module reads its parameters."""
        if fp32 and self._cached:
            return
        for name in self._spec["tables"]:
            owner, _, leaf = name.rpartition(".")
            setattr(self.inner.get_submodule(owner), leaf, self._table(name).dequantize() if fp32 else None)
        self._cached = fp32

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._put_tables(fp32=False)  # new codes: the fp32 copies are remade at the next lookup

    def _tables_dtype(self) -> torch.dtype:
        # the tables' original dtype: a quantized full table may have no parameter left to read it from
        return self._dtype

    def memory(self) -> MemoryReport:
        """Floats: fp32 parameters left, codebooks, scales and biases; index: codes and the method's buffers; the
        method's sketch apart. The total is the bytes of ``state_dict()``."""
        state = self.state_dict(keep_vars=True)
        floats = sum(
            t.numel() * t.element_size()
            for key, t in state.items()
            if isinstance(t, torch.nn.Parameter) or (key.startswith("tables.") and not key.endswith(".codes"))
        )
        index = sum(t.numel() * t.element_size() for t in state.values()) - floats
        sketch = min(self._sketch_bytes, index)
        return MemoryReport(float_bytes=floats, index_bytes=index - sketch, sketch_bytes=sketch)

    def train(self, mode: bool = True) -> QuantizedEmbedding:
        """Sets the mode, but the wrapped method always runs in eval mode: its tables are frozen."""
        super().train(mode)
        self.inner.eval()
        return self

    def reset_parameters(self) -> None:
        # the base class would redraw the wrapped method's hashes, which its codes were made for
        raise NotImplementedError(f"{self._who()}: a quantized module is not re-initialised; quantize a new one")

    reset_tables = reset_parameters

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scheme={self.scheme!r}"

    def __repr__(self) -> str:
        # one line: the wrapped module's own repr would report its tables' bytes, which now live here
        return f"{type(self).__name__}({type(self.inner).__name__}, {self.extra_repr()})"


def quantize(
    model_or_module: _Module,
    scheme: str = "int8",
    *,
    compression: float | None = None,
    subspaces: int | None = None,
    centroids: int = 256,
    seed: int = 0,
) -> _Module:
    """A quantized deep copy, in eval mode, of a CompressedEmbedding or of a model holding them; see the module doc.

    Args:
        model_or_module: a CompressedEmbedding (returned as a QuantizedEmbedding) or a module holding them (returned
            as its own type, the outermost ones wrapped); never modified.
        scheme: ``"int8"``, ``"int4"`` (row-wise) or ``"pq"`` (product quantization).
        compression, subspaces: ``"pq"`` only, one of them: each table's fp32 bytes / its target bytes, or its
            subspaces (1 to its width; default ceil(width / 4)). BudgetError for a ratio a table cannot reach.
        centroids: ``"pq"``: centroids per subspace, 2 to 256 (uint8 codes). seed: seeds PQ's k-means.
    """
    _check_arguments(scheme, compression, subspaces, centroids, seed)
    holder = torch.nn.ModuleDict({"model": copy.deepcopy(model_or_module)})  # so the module itself can be replaced
    wrapped: dict[int, QuantizedEmbedding] = {}  # a module held in two places is quantized once

    def replace(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if not isinstance(child, CompressedEmbedding):
                replace(child)
                continue
            if id(child) not in wrapped:
                wrapped[id(child)] = _quantize_module(child, scheme, compression, subspaces, centroids, seed)
            parent._modules[name] = wrapped[id(child)]

    with torch.no_grad():
        replace(holder)
    if not wrapped:
        raise ValueError(f"{type(model_or_module).__name__} holds no CompressedEmbedding to quantize")
    return holder["model"].eval()  # type: ignore[return-value]


def _quantize_module(
    module: CompressedEmbedding,
    scheme: str,
    compression: float | None,
    subspaces: int | None,
    centroids: int,
    seed: int,
) -> QuantizedEmbedding:
    if isinstance(module, QuantizedEmbedding):
        raise TypeError(f"{module._who()} is quantized already")
    tables = {
        name: p for name, p in module.named_parameters() if p.is_floating_point() and p.dim() == 2 and p.shape[0] >= 2
    }
    specs = {}
    for name, table in tables.items():
        where = f"{module._who()}: table {name!r} ({table.shape[0]:,} x {table.shape[1]})"
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"{where} holds values that are not finite")
        spec = _plan(where, table, scheme, compression, subspaces, centroids)
        if spec is None:  # quantized, it would not be smaller: it stays fp32
            continue
        if spec["scheme"] != "pq" and float(table.abs().max()) > FP16_MAX:
            raise ValueError(f"{where} holds values beyond {FP16_MAX:g}, past the fp16 of its scales and biases")
        specs[name] = spec
    quantized = QuantizedEmbedding(module, {"scheme": scheme, "method": module.method_name, "tables": specs})
    for name in specs:
        quantized._table(name).fit(tables[name], seed)
    return quantized


def _plan(
    where: str, table: Tensor, scheme: str, compression: float | None, subspaces: int | None, centroids: int
) -> dict[str, Any] | None:
    """The spec of one table, or None where quantizing would not make it smaller."""
    rows, cols = table.shape
    base = {"rows": rows, "cols": cols, "dtype": str(table.dtype).removeprefix("torch.")}
    if scheme != "pq" or rows < 2 * centroids:  # PQ's small tables are stored int8
        spec = {"scheme": "int8" if scheme == "pq" else scheme, **base, "group_rows": -(-GROUP_VALUES // cols)}
        return spec if _rowwise_bytes(spec) < table.numel() * table.element_size() else None
    if subspaces is not None and subspaces > cols:
        raise ValueError(f"subspaces={subspaces} is out of range for {where}: need 1 <= subspaces <= {cols}")
    m = subspaces or -(-cols // PQ_WIDTH)
    if compression is not None:
        full, sizes = (
            rows * cols * FLOAT_BYTES,
            {count: rows * count + centroids * cols * FLOAT_BYTES for count in range(1, cols + 1)},
        )
        if not sizes[1] * (1 - BUDGET_TOLERANCE) <= full / compression <= sizes[cols] * (1 + BUDGET_TOLERANCE):
            raise BudgetError(
                f"pq cannot compress {where} by {compression:g}x: with {centroids} centroids per subspace it reaches "
                f"from {full / sizes[cols]:.2f}x (subspaces={cols}) to {full / sizes[1]:.2f}x (subspaces=1)"
            )
        m = min(sizes, key=lambda count: abs(sizes[count] - full / compression))
    widths = [cols // m + (j < cols % m) for j in range(m)]
    return {"scheme": "pq", **base, "subspaces": m, "widths": widths, "centroids": centroids}


def _rowwise_bytes(spec: Mapping[str, Any]) -> int:
    groups, width = -(-spec["rows"] // spec["group_rows"]), spec["group_rows"] * spec["cols"]
    return groups * ((width if spec["scheme"] == "int8" else -(-width // 2)) + 4)  # + fp16 scale and bias


def _round_fp16(values: Tensor, down: bool) -> Tensor:
    """``values`` as fp16, rounded toward -inf (``down``) or +inf, so the stored range covers the true one."""
    half = values.half()
    off = half.float() > values if down else half.float() < values
    return torch.where(off, half.nextafter(torch.full_like(half, -math.inf if down else math.inf)), half)


def _key(name: str) -> str:
    return name.replace(".", "__")  # module names hold no dots


def _check_arguments(scheme: str, compression: float | None, subspaces: int | None, centroids: int, seed: int) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if scheme not in SCHEMES:
        close = difflib.get_close_matches(str(scheme), SCHEMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown scheme {scheme!r}; {hint}available: {', '.join(SCHEMES)}")
    if scheme != "pq" and (compression is not None or subspaces is not None):
        raise ValueError(f"compression and subspaces apply to scheme 'pq' only; {scheme!r} stores a fixed size")
    if compression is not None and subspaces is not None:
        raise ValueError("give compression or subspaces, not both")
    if compression is not None and not (
        isinstance(compression, numbers.Real)
        and not isinstance(compression, bool)
        and math.isfinite(compression)
        and compression > 0
    ):
        raise ValueError(f"compression must be a positive number, got {compression!r}")
    if subspaces is not None and not (is_int(subspaces) and subspaces >= 1):
        raise ValueError(f"subspaces must be a positive int, got {subspaces!r}")
    if not (is_int(centroids) and 2 <= centroids <= 256):
        raise ValueError(f"centroids must be an int from 2 to 256 (codes are uint8), got {centroids!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
