"""Adagrad for tables: torch's Adagrad with packed tables updated together (:class:`RowAdagrad`), and row-wise
Adagrad with one accumulator per row (:class:`RowwiseAdagrad`, FBGEMM's ``EXACT_ROWWISE_ADAGRAD``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from compemb.optim.base import RowWiseOptimizer
from compemb.optim.rows import add_to_rows, unique_rows


class RowAdagrad(RowWiseOptimizer):
    """torch's Adagrad (``sum += g^2``, ``param -= lr * g / (sqrt(sum) + eps)``, rows of sparse gradients only), with
    tables packed in one buffer updated together; its state (``sum``, ``step``) is torch's, so checkpoints of either
    load into the other. No lr decay and no weight decay (the Trainer uses neither).

    Example::

        >>> table = torch.nn.Embedding(10, 2, sparse=True)
        >>> optimizer = RowAdagrad(table.parameters(), lr=0.5)
        >>> table(torch.tensor([4])).sum().backward(); optimizer.step()
        >>> optimizer.state[table.weight]["sum"][[4, 5]].tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """

    row_state = {"sum": "param"}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        capturable: bool = False,
    ) -> None:
        if not lr > 0 or not initial_accumulator_value >= 0 or not eps > 0:
            raise ValueError(
                f"RowAdagrad needs lr > 0, initial_accumulator_value >= 0, eps > 0; got {lr}, "
                f"{initial_accumulator_value}, {eps}"
            )
        super().__init__(
            params,
            {
                "lr": lr,
                "initial_accumulator_value": initial_accumulator_value,
                "eps": eps,
                "lr_decay": 0.0,
                "weight_decay": 0.0,
            },
        )
        self.capturable = bool(capturable)

    def _initial(self, name: str, group: dict[str, Any]) -> float:
        return group["initial_accumulator_value"]

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = super()._new_state(param, group)
        self._step_tensor(param, state)
        return state

    def _new_param_scalars(self, state: dict[str, Any]) -> None:
        state.setdefault("step", torch.zeros((), dtype=torch.float32))  # (on the device at its first count)

    def _sparse(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "step" in state:  # a table's own count (packed tables count theirs in _packed)
            self._step_tensor(param, state).add_(1)
        rows, values = unique_rows(grad)
        if rows.numel() == 0:
            return
        sums = state["sum"][rows].addcmul_(values, values)
        state["sum"].index_copy_(0, rows, sums)
        add_to_rows(param, rows, values / sums.sqrt().add_(group["eps"]), -group["lr"])

    def _dense(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state.update(self._new_state(param, group))
        self._step_tensor(param, state).add_(1)
        assert param.grad is not None  # _dense is called for parameters with a gradient only
        state["sum"].addcmul_(param.grad, param.grad, value=1)
        param.addcdiv_(param.grad, state["sum"].sqrt().add_(group["eps"]), value=-group["lr"])


class RowwiseAdagrad(RowWiseOptimizer):
    """Row-wise Adagrad (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, TorchRec's default for tables): one accumulator per
    row, ``sum_r += mean(g_r^2)``, ``param_r -= lr * g_r / (sqrt(sum_r) + eps)``: a 4-byte state per row instead of
    a row-sized one. Sparse gradients update only the rows they name; a dense gradient updates every row (dim 0;
    a 1-D parameter's entries are its rows). No lr decay, no weight decay.

    Example::

        >>> table = torch.nn.Embedding(10, 2, sparse=True)
        >>> optimizer = RowwiseAdagrad(table.parameters(), lr=0.5)
        >>> table(torch.tensor([4])).sum().backward(); optimizer.step()
        >>> optimizer.state[table.weight]["sum"][[4, 5]].tolist()  # the mean of the row's squared gradient
        [1.0, 0.0]
    """

    row_state = {"sum": "row"}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        capturable: bool = False,
    ) -> None:
        if not lr > 0 or not initial_accumulator_value >= 0 or not eps > 0:
            raise ValueError(
                f"RowwiseAdagrad needs lr > 0, initial_accumulator_value >= 0, eps > 0; got {lr}, "
                f"{initial_accumulator_value}, {eps}"
            )
        super().__init__(params, {"lr": lr, "initial_accumulator_value": initial_accumulator_value, "eps": eps})
        self.capturable = bool(capturable)  # (nothing counted: nothing of it on the host either way)

    def _initial(self, name: str, group: dict[str, Any]) -> float:
        return group["initial_accumulator_value"]

    def _sparse(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        rows, values = unique_rows(grad)
        if rows.numel() == 0:
            return
        sums = state["sum"][rows] + values.float().pow(2).mean(1)
        state["sum"].index_copy_(0, rows, sums)
        scale = (sums.sqrt() + group["eps"]).to(values.dtype).unsqueeze(1)
        add_to_rows(param, rows, values / scale, -group["lr"])

    def _dense(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state.update(self._new_state(param, group))
        assert param.grad is not None  # _dense is called for parameters with a gradient only
        grad = param.grad.reshape(param.shape[0], -1) if param.dim() else param.grad.reshape(1, 1)
        state["sum"].add_(grad.float().pow(2).mean(1))
        shape = (-1,) + (1,) * max(param.dim() - 1, 0)
        param.addcdiv_(param.grad, (state["sum"].sqrt() + group["eps"]).to(param.dtype).view(shape), value=-group["lr"])
