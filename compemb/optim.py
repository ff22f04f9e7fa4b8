"""Row-wise Adam: embedding tables update only the rows a batch touched, so a step costs O(batch), not O(table).

torch's Adam needs dense gradients, so every step touches every row of every table (its moments decay even where
the gradient is zero): O(vocabulary) work per step, which is what stops a 33.8M-row table from training at
speed. :class:`RowAdam` takes each parameter as its gradient comes:

- a **sparse** gradient (a table built with ``sparse=True``): only the rows it names are updated, their moments
  and their own step count, and the bias correction uses the row's count (``1 - beta^k`` after the row's k-th
  update). A row seen every step is updated exactly as torch's Adam updates it; a rare row is not decayed while
  unseen (the "lazy Adam" of TensorFlow's LazyAdam and torch's SparseAdam, whose bias correction uses the global
  step instead, so a row first seen late starts with ~3x the step of a new parameter);
- a **dense** gradient (the MLPs): torch's Adam update (no amsgrad, no weight decay).

Tables whose weights lie side by side in one buffer (a table batch, :mod:`compemb.table_batch`) are updated
together, as FBGEMM's fused optimizers update a table-batched embedding: their states are kept side by side too,
and one step coalesces, gathers and scatters the rows of all of them at once (the same arithmetic per row; a row
named twice in a batch may sum its gradients in another order, a difference of float rounding).

A row that changes owner (CAFE promotion, CCE clustering) is reset by
:func:`compemb.embeddings.adaptive.reset_optimizer_rows`: its moments and its count go to zero, so its next update
is a first update, as a new parameter's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

ROW_STEPS = "row_steps"  # per-row update counts of a parameter with sparse gradients


def unique_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The rows a sparse 2-D gradient names, ascending, and each one's summed gradient (``coalesce()``'s result,
    several times faster on CPU: the sort runs on int32 row numbers where they fit)."""
    indices, values = grad._indices()[0], grad._values()
    narrow = indices.int() if grad.shape[0] < 2**31 else indices
    rows, inverse = torch.unique(narrow, return_inverse=True)
    summed = values.new_zeros(rows.numel(), *values.shape[1:]).index_add_(0, inverse, values)
    return rows.long(), summed


class RowAdam(torch.optim.Optimizer):
    """Adam with row-wise lazy updates for parameters whose gradients are sparse; see the module docstring.

    Example::

        >>> table = torch.nn.Embedding(1000, 4, sparse=True)
        >>> optimizer = RowAdam(table.parameters(), lr=0.1)
        >>> before = table.weight.detach().clone()
        >>> table(torch.tensor([3, 3, 7])).sum().backward(); optimizer.step()
        >>> int((table.weight != before).any(1).sum()), optimizer.state[table.weight]["row_steps"][[3, 7, 8]].tolist()
        (2, [1.0, 1.0, 0.0])
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0:
            raise ValueError(f"RowAdam needs lr > 0, betas in [0, 1), eps > 0; got {lr}, {betas}, {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            shared: dict[tuple, list[Tensor]] = {}  # sparse tables by the buffer their weights are slices of
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse and param.dim() == 2 and param.is_contiguous():
                    key = (param.untyped_storage().data_ptr(), param.dtype, param.shape[1])
                    shared.setdefault(key, []).append(param)
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if param.grad.is_sparse:
                    self._rows(param, param.grad, state, beta1, beta2, lr, eps)
                else:
                    self._dense(param, state, beta1, beta2, lr, eps)
            for params in shared.values():
                if len(params) == 1:
                    state = self.state[params[0]]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(params[0])
                        state["exp_avg_sq"] = torch.zeros_like(params[0])
                    self._rows(params[0], params[0].grad, state, beta1, beta2, lr, eps)
                else:
                    self._packed_rows(params, beta1, beta2, lr, eps)
        return loss

    def _packed_rows(self, params: list[Tensor], beta1: float, beta2: float, lr: float, eps: float) -> None:
        """One row-wise update of tables that are slices of one buffer, through the whole buffer and its states."""
        first = params[0]
        row_dim = first.shape[1]
        starts = [param.storage_offset() // row_dim for param in params]
        total_rows = first.untyped_storage().nbytes() // (row_dim * first.element_size())
        weight = first.new_empty(0).set_(first.untyped_storage(), 0, (total_rows, row_dim))  # the whole buffer
        indices = torch.cat([param.grad._indices()[0] + start for param, start in zip(params, starts)])  # type: ignore[union-attr]
        values = torch.cat([param.grad._values() for param in params])  # type: ignore[union-attr]
        grad = torch.sparse_coo_tensor(indices.unsqueeze(0), values, weight.shape, check_invariants=False)
        self._rows(weight, grad, self._packed_state(params, starts, total_rows), beta1, beta2, lr, eps)

    def _packed_state(self, params: list[Tensor], starts: list[int], total_rows: int) -> dict[str, Tensor]:
        """The tables' states as whole buffers whose slices are each table's state. Made again (keeping the values
        the tables had, from a checkpoint say) when they are not such slices."""
        first = params[0]
        widths = {"exp_avg": first.shape[1], "exp_avg_sq": first.shape[1], ROW_STEPS: 1}
        head = self.state[first]

        def packed(name: str) -> bool:
            if name not in head or head[name].untyped_storage().nbytes() != total_rows * widths[name] * 4:
                return False
            storage = head[name].untyped_storage().data_ptr()
            return all(
                name in self.state[param] and self.state[param][name].untyped_storage().data_ptr() == storage
                and self.state[param][name].storage_offset() == start * widths[name]
                for param, start in zip(params, starts)
            )

        if first.dtype == torch.float32 and all(packed(name) for name in widths):
            return {name: head[name].new_empty(0).set_(head[name].untyped_storage(), 0,
                                                       (total_rows, widths[name]) if name != ROW_STEPS else (total_rows,))
                    for name in widths}
        buffers = {
            "exp_avg": first.new_zeros(total_rows, widths["exp_avg"]),
            "exp_avg_sq": first.new_zeros(total_rows, widths["exp_avg"]),
            ROW_STEPS: torch.zeros(total_rows, dtype=torch.float32, device=first.device),
        }
        for param, start in zip(params, starts):
            state = self.state[param]
            for name, buffer in buffers.items():
                view = buffer[start : start + param.shape[0]]
                if name in state:
                    view.copy_(state[name])
                state[name] = view
        return buffers

    @staticmethod
    def _rows(param: Tensor, grad: Tensor, state: dict[str, Any], beta1: float, beta2: float, lr: float,
              eps: float) -> None:
        if ROW_STEPS not in state:
            state[ROW_STEPS] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
        rows, values = unique_rows(grad)
        if rows.numel() == 0:
            return
        steps = state[ROW_STEPS][rows] + 1
        state[ROW_STEPS].index_copy_(0, rows, steps)
        exp_avg = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        shape = (-1,) + (1,) * (param.dim() - 1)
        correction1 = (1 - beta1 ** steps.double()).to(param.dtype).view(shape)
        correction2 = (1 - beta2 ** steps.double()).sqrt().to(param.dtype).view(shape)
        update = (exp_avg / correction1) / (exp_avg_sq.sqrt() / correction2 + eps)
        param.index_add_(0, rows, update, alpha=-lr)

    @staticmethod
    def _dense(param: Tensor, state: dict[str, Any], beta1: float, beta2: float, lr: float, eps: float) -> None:
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(param.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
