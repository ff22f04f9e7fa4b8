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
  after any other eager step or evaluation (whatever they made, the graph does not read stale memory);
- **nothing made during a capture that outlives it**: a capture records, it does not run, so a cache a step fills
  lazily (packed constants, CCE's holder ids after a clustering) must already hold what the step reads. A graph is
  captured only after a steady step ran eagerly since the last invalidation (``warm``): that step refreshed them.

:func:`compemb.bench.replay.replay_check` runs a step twice under a dispatch mode and names what would differ
between two replays: the test of every method's step on CPU, where no CUDA graph can run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

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
    (:meth:`invalidate`); otherwise it captures one (the capture records; its replay is this step's work), which it
    may only once a steady step ran eagerly since (``warm``, set by the caller; see the module docstring).
    """

    def __init__(self, body: Callable[[tuple[Tensor, ...]], None], device: torch.device) -> None:
        self.body, self.device = body, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, ...] = ()
        self.warm = False  # a steady step ran eagerly since the last invalidation: the caches it reads are made
        self.captures = 0  # how many times a graph was captured (each after an eager step or evaluation)

    def ready(self) -> bool:
        """Whether a steady step may go through the graph now (replayed, or captured first)."""
        return self.graph is not None or self.warm

    def fits(self, batch: Sequence[Tensor]) -> bool:
        """Whether ``batch`` has the shapes and dtypes of the batches the graph was captured for."""
        return len(batch) == len(self.inputs) and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(batch, self.inputs)
        )

    def invalidate(self) -> None:
        """Forget the graph: work outside it (an eager step, an evaluation) may have replaced what it reads."""
        self.graph, self.warm = None, False

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


__all__ = ["StepGraph", "WARMUP_STEPS", "eager_on_side_stream", "prepare", "refusal"]
