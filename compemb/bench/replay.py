"""Whether a training step can be replayed by a CUDA graph, checked on any device (``--cuda-graph``,
:mod:`compemb.cuda_graph`): a replay repeats the recorded kernels with their recorded arguments on the recorded
memory, so two steps must dispatch the same ops with the same scalar arguments, update their state in place and
read nothing back to the host."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from compemb.bench.syncs import SyncCounter

# ops that launch nothing and read no value: their arguments are not part of what a replay must repeat
_METADATA = ("profiler.",)


class _Recording(TorchDispatchMode):
    """Every op a step dispatches, with its non-tensor arguments (which a replay would keep) and tensor shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[Any, ...], str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not name.startswith(_METADATA):
            flat, _ = tree_flatten((args, kwargs or {}))
            signature = tuple(
                (tuple(a.shape), a.dtype, a.device.type) if isinstance(a, Tensor) else _plain(a) for a in flat
            )
            self.ops.append((name, signature, _place()))
        return func(*args, **(kwargs or {}))


def _plain(value: Any) -> Any:
    if isinstance(
        value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
    ):
        return value
    return type(value).__name__


def _place() -> str:
    """The innermost compemb line on the stack (where an op came from)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/compemb/" in frame.filename and not frame.filename.endswith(("bench/replay.py", "bench/syncs.py")):
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


def replay_check(
    step: Callable[[], None], model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2
) -> list[str]:
    """Run ``step`` ``steps`` times and say what a CUDA graph's replay of the first would get wrong: an op that
    differs from the first step's (its kind, shape or a scalar argument: a host value baked into the graph), a
    state tensor replaced instead of updated in place, a value read back by the host (on the device code path,
    :class:`compemb.bench.syncs.SyncCounter`). An empty list: the steps are replays of one another."""
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
                problems.append(
                    f"step {index + 1}: {key} "
                    + ("replaced" if key in before and key in after else "appeared" if key in after else "vanished")
                )
        before = after
    first = recorded[0]
    for index, ops in enumerate(recorded[1:], start=2):
        if len(ops) != len(first):
            problems.append(f"step {index}: {len(ops)} ops, step 1 {len(first)}")
        for (name, signature, place), (name_then, signature_then, _) in zip(ops, first):
            if (name, signature) != (name_then, signature_then):
                changed = [f"{a!r} (was {b!r})" for a, b in zip(signature, signature_then) if a != b]
                problems.append(
                    f"step {index}: {name} at {place}: "
                    + (", ".join(changed[:3]) if name == name_then else f"step 1 ran {name_then}")
                )
                break  # after one difference the rest is out of step
    return problems


__all__ = ["replay_check"]
