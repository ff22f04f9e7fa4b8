"""Host synchronisations per training step: the ops that make a CUDA host wait for its device, counted anywhere.

A CUDA step runs at the device's speed only while the host queues kernels ahead of it; every op whose result the
host must see (an ``item()``, a ``nonzero`` whose size decides the next allocation, data copied to or from host
memory) drains that queue. :class:`SyncCounter` counts those ops in whatever runs under it, from the dispatcher up,
on any device: run on CPU with ``kernels="torch"`` (:mod:`compemb.kernels`) a step takes exactly the code path of a
CUDA step, so its count is the CUDA step's, and a test can hold it at zero without a GPU. On CUDA
:func:`measure_syncs` also counts the real ones (``torch.cuda.set_sync_debug_mode``).

Counted: ``_local_scalar_dense`` (``item``, ``int``, ``float``, ``bool`` of a tensor), ``nonzero``, ``unique`` and
its variants, ``bincount``, ``masked_select``, indexing by a boolean mask (read or write), ``repeat_interleave``
without ``output_size``, ``equal``, ``is_nonzero``, sparse ``coalesce`` (its size is data-dependent), tensors made
from host data (``torch.tensor``, ``from_numpy``: ``lift_fresh``), and ``tolist``, ``numpy``, ``cpu``.
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from compemb.embeddings.base import CompressedEmbedding

_aten = torch.ops.aten
# ops whose result the host must read before it can go on (their output size or value is data-dependent)
WAITING_OPS = {
    _aten._local_scalar_dense.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.bincount.default: "bincount",
    _aten.masked_select.default: "masked_select",
    _aten.equal.default: "equal",
    _aten.is_nonzero.default: "is_nonzero",
    _aten._unique.default: "unique",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten._coalesce.default: "coalesce",
    _aten.lift_fresh.default: "tensor from host data",
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
# ops that launch nothing on a device (views are left out too): the rest approximates the kernels a step launches
_NO_KERNEL = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.detach.default,
    _aten.alias.default,
    _aten.lift_fresh.default,
    _aten._local_scalar_dense.default,
}
_HOST_METHODS = {"tolist": "tolist", "numpy": "numpy", "cpu": "cpu"}
_HERE = str(Path(__file__).resolve())


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = WAITING_OPS.get(func)
        if name is None and func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                name = "boolean mask index"
        if name is None and func.overloadpacket is _aten.repeat_interleave and kwargs.get("output_size") is None:
            name = "repeat_interleave"
        if name is not None:
            self.counter.record(name)
        if not func.is_view and func not in _NO_KERNEL:
            self.counter.ops += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _HOST_METHODS.get(getattr(func, "__name__", ""))
        if name is not None and args and isinstance(args[0], torch.Tensor):
            self.counter.record(name)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts, by kind and by the line of compemb that asked, the ops that would make a CUDA host wait.

    Example::

        >>> with SyncCounter() as counter:
        ...     x = torch.arange(6)
        ...     _ = x.sum(), x[x > 2], int(x.max())
        >>> counter.total, dict(counter.kinds)
        (2, {'boolean mask index': 1, 'item': 1})
    """

    def __init__(self) -> None:
        self.kinds: collections.Counter[str] = collections.Counter()
        self.places: collections.Counter[str] = collections.Counter()
        self.ops = 0  # every op that would launch a kernel on a device (views and allocations left out)
        self._modes: list[Any] = []

    @property
    def total(self) -> int:
        """Every counted op."""
        return sum(self.kinds.values())

    def record(self, kind: str) -> None:
        """Count one op of ``kind`` at the innermost compemb line on the stack (else the innermost line)."""
        self.kinds[kind] += 1
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename != _HERE and "/torch/" not in f.filename]
        ours = [f for f in frames if "/compemb/" in f.filename]
        candidates = ours or frames
        frame = candidates[-1] if candidates else None
        where = (
            "?" if frame is None else f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
        )
        self.places[f"{where} ({kind})"] += 1

    def __enter__(self) -> SyncCounter:
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []


def _progress(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, CompressedEmbedding):
            for key, value in module.progress().items():
                counts[key] = counts.get(key, 0) + value
    return counts


def _stepping_trainer(config: Any, out: str, **changes: Any) -> tuple[Any, list[CompressedEmbedding]]:
    """A Trainer of ``config`` that only steps (no evaluation, no checkpoint; run directory ``out``) and its tables,
    told the run's length as ``fit`` tells them."""
    from compemb.train import Trainer

    trainer = Trainer(
        dataclasses.replace(
            config,
            out=out,
            epochs=10**6,
            eval_every=0,
            evals_per_epoch=0,
            checkpoint_minutes=0,
            checkpoint_epochs=False,
            **changes,
        )
    )
    adaptive = [m for m in trainer.model.modules() if isinstance(m, CompressedEmbedding)]
    for module in adaptive:
        module.on_train_begin(trainer.total_steps, trainer.steps_per_epoch)
    return trainer, adaptive


def count_step_syncs(config: Any, warmup: int = 5, steps: int = 30) -> dict[str, Any]:
    """Train ``config`` (a :class:`~compemb.train.TrainConfig`, run with ``kernels="torch"`` on CPU) ``warmup``
    steps, then count the waiting ops of each of ``steps`` more.

    Steps in which a method's own counters moved (CCE's clusterings: a planned host-side job) are reported apart
    and left out of the per-step figures. Returns ``{"method", "steps", "per_step" (mean), "most" (the largest
    step), "excluded", "ops_per_step" (ops that would launch a kernel: views and allocations left out), "kinds",
    "places"}``.
    """
    from compemb.kernels import use_kernels

    with tempfile.TemporaryDirectory(prefix="compemb-syncs-") as out:
        kernels = "torch" if torch.device(config.device).type == "cpu" else "auto"
        trainer, adaptive = _stepping_trainer(config, out, kernels=kernels)
        config = trainer.config
        counts, ops, excluded = [], [], 0
        kinds: collections.Counter[str] = collections.Counter()
        places: collections.Counter[str] = collections.Counter()
        with use_kernels(config.kernels):
            for _ in range(warmup):
                trainer.train_step(trainer.prepared_batch(trainer.step), adaptive)
            for _ in range(steps):
                batch = trainer.prepared_batch(trainer.step)  # the reader's work, apart from the step
                before = _progress(trainer.model)
                with SyncCounter() as counter:
                    trainer.train_step(batch, adaptive)
                if _progress(trainer.model) != before:
                    excluded += 1
                    continue
                counts.append(counter.total)
                ops.append(counter.ops)
                kinds.update(counter.kinds)
                places.update(counter.places)
        measured = max(1, len(counts))
        return {
            "method": config.method,
            "steps": len(counts),
            "per_step": sum(counts) / measured,
            "most": max(counts, default=0),
            "excluded": excluded,
            "ops_per_step": sum(ops) / measured,
            "kinds": dict(kinds),
            "places": {place: count / measured for place, count in places.most_common()},
        }


def count_cuda_syncs(config: Any, warmup: int = 10, steps: int = 50) -> float:
    """The real synchronisations per step on CUDA (``torch.cuda.set_sync_debug_mode("warn")``)."""
    with tempfile.TemporaryDirectory(prefix="compemb-syncs-") as out:
        trainer, adaptive = _stepping_trainer(config, out)
        for _ in range(warmup):
            trainer.train_step(trainer.prepared_batch(trainer.step), adaptive)
        torch.cuda.synchronize()
        batches = [trainer.prepared_batch(trainer.step + i) for i in range(steps)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for batch in batches:
                    trainer.train_step(batch, adaptive)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught) / steps


def measure_syncs(base: Any, methods: Sequence[str], warmup: int = 5, steps: int = 30) -> list[dict[str, Any]]:
    """:func:`count_step_syncs` for each of ``methods`` on ``base``'s data and model (and on CUDA the real count)."""
    from compemb.budget import BudgetError
    from compemb.registry import get_method

    rows = []
    for method in methods:
        compression = base.compression if get_method(method.split(":")[0]).compresses else None
        config = dataclasses.replace(base, method=method, compression=compression)
        try:
            row = count_step_syncs(config, warmup, steps)
        except BudgetError as error:  # a method that cannot be built at this budget is a row that says so
            rows.append(
                {
                    "method": method,
                    "steps": 0,
                    "per_step": float("nan"),
                    "most": 0,
                    "excluded": 0,
                    "ops_per_step": float("nan"),
                    "kinds": {},
                    "places": {},
                    "note": str(error),
                }
            )
            continue
        if torch.device(base.device).type == "cuda":
            row["cuda_per_step"] = count_cuda_syncs(config)
        rows.append(row)
    return rows


def format_syncs(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`measure_syncs`'s rows: ops per step and the lines that ask."""
    cuda = any("cuda_per_step" in row for row in rows)
    head = "| method | waits/step | most in a step | steps (left out) | ops/step |" + (
        " CUDA syncs/step |" if cuda else ""
    )
    lines = [head + " where |", "|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---|"]
    for row in rows:
        where = "; ".join(f"{place} x{count:g}" for place, count in list(row["places"].items())[:4]) or row.get(
            "note", "—"
        )
        cells = [
            row["method"],
            f"{row['per_step']:.2f}",
            str(row["most"]),
            f"{row['steps']} ({row['excluded']})",
            f"{row.get('ops_per_step', float('nan')):,.0f}",
        ]
        if cuda:
            cells.append(f"{row.get('cuda_per_step', float('nan')):.2f}")
        lines.append("| " + " | ".join(cells + [where]) + " |")
    return "\n".join(lines) + "\n"
