"""One training step on the device: forward, the loss (checked for non-finite values), backward, the tables'
gradients averaged over ranks, the optimizer's step, the methods' own hooks, the loss's moving average; with
``--cuda-graph``, a replay of the captured step wherever the step is steady."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from compemb import cuda_graph, distributed
from compemb.collection import EmbeddingCollection
from compemb.embeddings.adaptive import end_step
from compemb.embeddings.base import CompressedEmbedding
from compemb.kernels import on_host
from compemb.train.batches import unpack_batch

Batch = tuple[Tensor, ...]


class TrainStep:
    """The step's state on the device: the loss's moving average, the first step whose loss was not finite, and
    with ``--cuda-graph`` the captured graph and the step number on the device."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        bags: list[dict],
        device: torch.device,
        batch_size: int,
        global_rows: Callable[[int], int],
        stop_if_not_finite: Callable[[float], None],
    ) -> None:
        """``train_model``: the module trained (``model``, or it under DDP or compiled); ``batch_size``: the rows of
        a whole batch (a step of fewer is never replayed); ``global_rows(step)``: the
        batch's rows over all ranks; ``stop_if_not_finite(loss)``: raises where the flag says a loss was not."""
        self.model, self.train_model, self.optimizer, self.bags, self.device = (
            model,
            train_model,
            optimizer,
            bags,
            device,
        )
        self.batch_size, self.global_rows, self.stop_if_not_finite = batch_size, global_rows, stop_if_not_finite
        self.world = distributed.world_size()
        self.table_parameters = [
            p for m in model.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters(recurse=False)
        ]
        # the loss's moving average stays on the device: reading a CUDA loss every step would wait for the step
        self.running_loss = torch.zeros((), dtype=torch.float64, device=device)
        # the first step whose loss was not finite (-1: none), kept on the device on the device code path (reading
        # the loss every step would make a GPU wait); on the host the loss is checked at once, before backward
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.forget_graph()

    def forget_graph(self) -> None:
        """Drop the captured graph and the device step count (captured again from a loaded state)."""
        self.graph: cuda_graph.StepGraph | None = None  # --cuda-graph: the captured step (made at the first)
        self.step_counter: Tensor | None = None  # --cuda-graph: the step number on the device
        self.host_step = 0  # the step a capture records (what the step's hooks are given on the host)

    def graphed(
        self, batch: Batch, step: int, adaptive: list[CompressedEmbedding], to_device: Callable[[Batch], Batch]
    ) -> None:
        """The step with ``--cuda-graph``: a replay of the captured step where the step is steady (past the
        warm-up, a whole batch, every table's every-step work), else eagerly (and the graph captured again)."""
        self.host_step = step
        if self.step_counter is None:
            self.step_counter = torch.full((), step, dtype=torch.int64, device=self.device)
        if self.graph is None:
            self.graph = cuda_graph.StepGraph(lambda inputs: self.body(inputs, self.host_step, adaptive), self.device)
        steady = len(batch[2]) == self.batch_size and all(module.steady_step(step) for module in adaptive)
        if steady and step >= cuda_graph.WARMUP_STEPS and self.graph.ready():
            self.graph.run(batch)
            return
        self.graph.invalidate()
        on_device = to_device(batch)
        cuda_graph.eager_on_side_stream(lambda: self.body(on_device, step, adaptive), self.device)
        self.graph.warm = steady  # (what a capture of the next step reads was made by this one)

    def body(self, batch: Batch, step: int, adaptive: list[CompressedEmbedding]) -> None:
        """The step's work on a batch on the device (all a CUDA graph captures; the host's count is the caller's)."""
        dense, sparse, labels, bags = unpack_batch(batch, self.bags)
        logits = self.train_model(dense, sparse, bags)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        on_device = step if self.step_counter is None else self.step_counter  # (a graph replays no host value)
        if on_host(loss):
            if not math.isfinite(float(loss.detach())):  # before backward: nothing of this step reaches the weights
                self.first_bad_step.fill_(step)
                self.stop_if_not_finite(float(loss.detach()))
        else:
            self.first_bad_step.copy_(
                torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss), on_device, self.first_bad_step)
            )
        if self.world > 1:  # DDP averages over ranks: each rank's mean weighted by its share of the batch
            loss = loss * (len(labels) * self.world / self.global_rows(step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.table_parameters)  # (one process: nothing to do)
        self.optimizer.step()
        # the methods' updates: under torchrun every table's recorded importance gathered in one collective, the
        # tables that update together (per-feature CAFE on a device) at once, then each table's own hook
        batches = [
            batch for m in self.model.modules() if isinstance(m, EmbeddingCollection) for batch in m.table_batches()
        ]
        end_step(adaptive, step, self.optimizer, batches)
        if step > 0:
            self.running_loss.mul_(0.98).add_(loss.detach(), alpha=0.02)
        else:
            self.running_loss.copy_(loss.detach())
        if self.step_counter is not None:
            self.step_counter.add_(1)
