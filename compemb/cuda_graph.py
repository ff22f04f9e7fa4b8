"""``--cuda-graph``: the steady-state training step captured once in a CUDA graph and replayed.

At batch 4,096 a step's arithmetic takes well under a millisecond on an H100; what a step costs is its hundreds of
kernel launches. A CUDA graph records them once and replays them in one launch (torch's "whole network capture",
``torch.cuda.graph``). A replay runs the recorded kernels on the recorded memory and runs no Python, so the step
must be the same kernels with the same arguments every time, its state updated in place, nothing read back:

- **counts on the device**: the optimizers' step counts and bias corrections (:class:`~compemb.optim.RowAdam`'s
  ``capturable``, as torch's Adam ``capturable=True``), the sketches' decay masses (``HotSketch.mass_on_device``),
  the step number the non-finite-loss flag records;
- **fixed shapes**: the batch is copied into buffers the graph reads; a batch of another shape (an epoch's last,
  short one) runs eagerly;
- **the same work**: a step where a method does more than its every-step work (a CCE clustering, the end of its
  scoring) runs eagerly (:meth:`CompressedEmbedding.steady_step`), and the graph is captured again afterwards, as
  after any other eager step or evaluation (whatever they made, the graph does not read stale memory).

:func:`replay_check` runs a step twice under a dispatch mode and names what would differ between two replays: the
test of every method's step on CPU, where no CUDA graph can run.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

WARMUP_STEPS = 3  # eager steps before a capture: lazily made state (optimizer moments, packed buffers) exists then


def refusal(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``model``'s training step cannot be replayed by a CUDA graph (None: it can)."""
    from compemb.embeddings.base import CompressedEmbedding
    from compemb.optim import CombinedOptimizer

    for name, module in model.named_modules():
        if isinstance(module, CompressedEmbedding):
            why = module.capture_refusal()
            if why is not None:
                return f"table {name.rsplit('.', 1)[-1]!r} ({module.method_name}) {why}"
    children = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for child in children:
        if not hasattr(child, "capturable") and not isinstance(child, torch.optim.SGD):
            return f"optimizer {type(child).__name__} keeps its step count on the host (use adam, adagrad or sgd)"
    return None


def prepare(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Keep every per-step count of ``model`` and ``optimizer`` on the device (see the module docstring)."""
    from compemb.optim import CombinedOptimizer
    from compemb.sketch.hotsketch import HotSketch

    for module in model.modules():
        if isinstance(module, HotSketch):
            module.mass_on_device = True
    children = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for child in children:
        if hasattr(child, "capturable"):
            child.capturable = True


class StepGraph:
    """A training step (``body(batch)``: device work only) captured in a CUDA graph and replayed on new batches.

    :meth:`run` replays where the graph was captured for batches of this shape and nothing ran eagerly since
    (:meth:`invalidate`); otherwise it captures one (the capture records; its replay is this step's work).
    """

    def __init__(self, body: Callable[[tuple[Tensor, ...]], None], device: torch.device) -> None:
        self.body, self.device = body, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, ...] = ()
        self.captures = 0  # how many times a graph was captured (each after an eager step or evaluation)

    def fits(self, batch: Sequence[Tensor]) -> bool:
        """Whether ``batch`` has the shapes and dtypes of the batches the graph was captured for."""
        return len(batch) == len(self.inputs) and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(batch, self.inputs))

    def invalidate(self) -> None:
        """Forget the graph: work outside it (an eager step, an evaluation) may have replaced what it reads."""
        self.graph = None

    def run(self, batch: Sequence[Tensor]) -> None:
        """One step on ``batch`` (host or device tensors) by the graph, captured first where needed."""
        if self.graph is None or not self.fits(batch):
            self._capture(batch)
        for static, tensor in zip(self.inputs, batch):
            static.copy_(tensor, non_blocking=True)
        assert self.graph is not None
        self.graph.replay()

    def _capture(self, batch: Sequence[Tensor]) -> None:
        self.graph = None
        torch.cuda.synchronize(self.device)  # the previous graph's memory is released only when it has run
        self.inputs = tuple(torch.empty_like(t, device=self.device) for t in batch)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels on a side stream; nothing runs until a replay
            self.body(self.inputs)
        self.graph, self.captures = graph, self.captures + 1


def eager_on_side_stream(body: Callable[[], None], device: torch.device) -> None:
    """Run ``body`` eagerly on a side stream (torch's advice for the steps before a capture: lazily made state
    belongs to no stream the capture forbids), the current stream waiting for it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)


# ops that launch nothing and read no value: their arguments are not part of what a replay must repeat
_METADATA = ("profiler.",)


class _Recording(TorchDispatchMode):
    """Every op a step dispatches, with its non-tensor arguments (which a replay would keep) and tensor shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[Any, ...], str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if not name.startswith(_METADATA):
            flat, _ = tree_flatten((args, kwargs or {}))
            signature = tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, Tensor) else _plain(a)
                              for a in flat)
            self.ops.append((name, signature, _place()))
        return func(*args, **(kwargs or {}))


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                          torch.memory_format)):
        return value
    return type(value).__name__


def _place() -> str:
    """The innermost compemb line on the stack (where an op came from)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/compemb/" in frame.filename and not frame.filename.endswith(("cuda_graph.py", "bench/syncs.py")):
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


def _state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Every tensor a step reads or updates (parameters, buffers, tensors a module keeps, the optimizer's state),
    by the identity of the tensor object."""
    found: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        found[f"{name}"] = id(tensor)
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, Tensor):
                found[f"{name}.{key}"] = id(value)
    for index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if isinstance(value, Tensor):
                found[f"optimizer state {index}.{key}"] = id(value)
    return found


def replay_check(step: Callable[[], None], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 steps: int = 2) -> list[str]:
    """Run ``step`` ``steps`` times and say what a CUDA graph's replay of the first would get wrong: an op that
    differs from the first step's (its kind, shape or a scalar argument: a host value baked into the graph), a
    state tensor replaced instead of updated in place, a value read back by the host (on the device code path,
    :class:`compemb.bench.syncs.SyncCounter`). An empty list: the steps are replays of one another."""
    from compemb.bench.syncs import SyncCounter

    problems: list[str] = []
    recorded: list[list[tuple[str, tuple[Any, ...], str]]] = []
    before = _state_tensors(model, optimizer)
    for index in range(steps):
        with SyncCounter() as counter, _Recording() as recording:
            step()
        if counter.total:
            problems.append(f"step {index + 1}: {counter.total} host reads ({dict(counter.places)})")
        recorded.append(recording.ops)
        after = _state_tensors(model, optimizer)
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                problems.append(f"step {index + 1}: {key} " + ("replaced" if key in before and key in after else
                                                               "appeared" if key in after else "vanished"))
        before = after
    first = recorded[0]
    for index, ops in enumerate(recorded[1:], start=2):
        if len(ops) != len(first):
            problems.append(f"step {index}: {len(ops)} ops, step 1 {len(first)}")
        for (name, signature, place), (name_then, signature_then, _) in zip(ops, first):
            if (name, signature) != (name_then, signature_then):
                changed = [f"{a!r} (was {b!r})" for a, b in zip(signature, signature_then) if a != b]
                problems.append(f"step {index}: {name} at {place}: " + (", ".join(changed[:3]) if name == name_then
                                                                        else f"step 1 ran {name_then}"))
                break  # after one difference the rest is out of step
    return problems


__all__ = ["StepGraph", "WARMUP_STEPS", "eager_on_side_stream", "prepare", "refusal", "replay_check"]
