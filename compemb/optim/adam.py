"""Row-wise Adam: lazy per-row updates for sparse gradients (each row's own step count), torch's Adam for dense
ones (see :mod:`compemb.optim`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor

from compemb.optim.base import RowWiseOptimizer
from compemb.optim.rows import add_to_rows, unique_rows

ROW_STEPS = "row_steps"  # per-row update counts of a parameter with sparse gradients
ROW_STEP_KEY = "row_reset_step"  # dense Adam: the step at which each row's state was reset; -1: never reset


class RowAdam(RowWiseOptimizer):
    """Adam with row-wise lazy updates for parameters whose gradients are sparse; see :mod:`compemb.optim`.

    Example::

        >>> table = torch.nn.Embedding(1000, 4, sparse=True)
        >>> optimizer = RowAdam(table.parameters(), lr=0.1)
        >>> before = table.weight.detach().clone()
        >>> table(torch.tensor([3, 3, 7])).sum().backward(); optimizer.step()
        >>> int((table.weight != before).any(1).sum()), optimizer.state[table.weight]["row_steps"][[3, 7, 8]].tolist()
        (2, [1.0, 1.0, 0.0])
    """

    row_state = {"exp_avg": "param", "exp_avg_sq": "param", ROW_STEPS: "row"}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        capturable: bool = False,
    ) -> None:
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0:
            raise ValueError(f"RowAdam needs lr > 0, betas in [0, 1), eps > 0; got {lr}, {betas}, {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.capturable = bool(capturable)

    def _sparse(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
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
        add_to_rows(param, rows, update, -lr)

    def _dense_all(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Adam's dense update of every parameter whose rows were never reset, with torch's multi-tensor
        (``_foreach``) ops, grouped by step count and device: the arithmetic of :meth:`_dense`, element for element,
        in a few launches for all of them (torch's Adam does the same with ``foreach=True``)."""
        together: dict[tuple, list[Tensor]] = {}
        for param in params:
            state = self.state[param]
            assert param.grad is not None  # the step passes parameters with a gradient only
            if state.get(ROW_STEP_KEY) is not None or param.grad.is_sparse:  # its own rows' ages: one by one
                self._dense(param, state, group)
                continue
            if not state:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if self.capturable:
                self._step_tensor(param, state)
                together.setdefault((None, param.device, param.dtype), []).append(param)
                continue
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
            known = self.__dict__.setdefault("_host_steps", {}).get(param)
            count = known[1] + 1 if known is not None and known[0] is state["step"] else float(state["step"]) + 1
            self._host_steps[param] = (state["step"], count)
            together.setdefault((count, param.device, param.dtype), []).append(param)
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        for (step, _, _), members in together.items():
            states = [self.state[param] for param in members]
            counts = [state["step"] for state in states]
            torch._foreach_add_(counts, 1.0)  # (host tensors unless capturable: no device launch)
            grads = [cast(Tensor, param.grad) for param in members]  # each has one (see above)
            exp_avgs, exp_avg_sqs = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            if step is None:  # capturable: the bias corrections from the counts on the device
                self._capturable_update(members, exp_avgs, denominators, counts, group)
                continue
            torch._foreach_div_(denominators, math.sqrt(1 - beta2**step))
            torch._foreach_add_(denominators, eps)
            torch._foreach_addcdiv_(members, exp_avgs, denominators, value=-lr / (1 - beta1**step))

    @staticmethod
    def _capturable_update(
        params: list[Tensor],
        exp_avgs: list[Tensor],
        denominators: list[Tensor] | tuple[Tensor, ...],
        counts: list[Tensor],
        group: dict[str, Any],
    ) -> None:
        """``param -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`` with ``t`` read by the kernels
        from the device (as torch's Adam with ``capturable=True``); ``denominators`` holds ``sqrt(v)``."""
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        correction2 = torch._foreach_pow(beta2, counts)  # 1 - beta2^t, square-rooted
        torch._foreach_neg_(correction2)
        torch._foreach_add_(correction2, 1.0)
        torch._foreach_sqrt_(correction2)
        scale = torch._foreach_pow(beta1, counts)  # -(1 - beta1^t) / lr: the denominator's scale
        torch._foreach_add_(scale, -1.0)
        torch._foreach_div_(scale, lr)
        torch._foreach_div_(denominators, correction2)
        torch._foreach_add_(denominators, eps)
        torch._foreach_mul_(denominators, scale)
        torch._foreach_addcdiv_(params, exp_avgs, denominators)

    def _dense(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if self.capturable:
            count = self._step_tensor(param, state).add_(1)
            state["exp_avg"].lerp_(param.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            reset_at = state.get(ROW_STEP_KEY)
            age = count if reset_at is None else torch.where(reset_at >= 0, count - reset_at, count)
            age = age.double().view((-1,) + (1,) * (param.dim() - 1)) if age.dim() else age.double()
            correction1 = (1 - torch.pow(beta1, age)).to(param.dtype)
            correction2 = (1 - torch.pow(beta2, age)).sqrt().to(param.dtype)
            denom = (state["exp_avg_sq"].sqrt() / correction2).add_(eps)
            param.addcdiv_(state["exp_avg"] / correction1, denom, value=-lr)
            return
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        step = self._next_step(param, state["step"])
        state["exp_avg"].lerp_(param.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
        reset_at = state.get(ROW_STEP_KEY)
        if reset_at is None:
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
            return
        # rows whose state was reset (a new owner) are corrected for their own age, as a parameter made then: with
        # the shared step their zeroed moments would give a first update of ~3x lr
        age = torch.where(reset_at >= 0, step - reset_at, step).double().view((-1,) + (1,) * (param.dim() - 1))
        correction1 = (1 - beta1**age).to(param.dtype)
        correction2 = (1 - beta2**age).sqrt().to(param.dtype)
        denom = (state["exp_avg_sq"].sqrt() / correction2).add_(eps)
        param.addcdiv_(state["exp_avg"] / correction1, denom, value=-lr)
