"""Row-wise Adam and Adagrad: embedding tables update only the rows a batch touched, so a step costs O(batch).

torch's Adam needs dense gradients, so every step touches every row of every table (its moments decay even where
the gradient is zero): O(vocabulary) work per step, which is what stops a 33.8M-row table from training at
speed. :class:`RowAdam` takes each parameter as its gradient comes:

- a **sparse** gradient (a table built with ``sparse=True``): only the rows it names are updated, their moments
  and their own step count, and the bias correction uses the row's count (``1 - beta^k`` after the row's k-th
  update). A row seen every step is updated exactly as torch's Adam updates it; a rare row is not decayed while
  unseen (the "lazy Adam" of TensorFlow's LazyAdam and torch's SparseAdam, whose bias correction uses the global
  step instead, so a row first seen late starts with ~3x the step of a new parameter);
- a **dense** gradient (the MLPs): torch's Adam update (no amsgrad, no weight decay).

:class:`RowAdagrad` is torch's Adagrad (whose sparse update is already row-wise; no lr decay, no weight decay) with
the same packing below: the Trainer's ``adagrad``.

Tables whose weights lie side by side in one buffer (a table batch, :mod:`compemb.table_batch`) are updated
together, as FBGEMM's fused optimizers update a table-batched embedding: their states are kept side by side too,
and one step coalesces, gathers and scatters the rows of all of them at once (the same arithmetic per row; a row
named twice in a batch may sum its gradients in another order, a difference of float rounding).

A row that changes owner (CAFE promotion, CCE clustering) is reset by
:func:`compemb.embeddings.adaptive.reset_optimizer_rows`: its moments and its count go to zero, so its next update
is a first update, as a new parameter's. With dense gradients (no per-row count) the reset records the step in
``row_reset_step`` and the row's bias correction uses its age since then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from compemb.kernels import device_path

ROW_STEPS = "row_steps"  # per-row update counts of a parameter with sparse gradients
ROW_STEP_KEY = "row_reset_step"  # dense Adam: the step at which each row's state was reset; -1: never reset


def unique_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The rows a sparse 2-D gradient names, ascending, and each one's summed gradient (``coalesce()``'s result,
    several times faster on CPU: the sort runs on int32 row numbers where they fit).

    On the device code path (:mod:`compemb.kernels`) the result has a fixed size instead, one slot per entry of
    the gradient, so the host never waits to learn how many rows there are (see :func:`segment_rows`).
    """
    indices, values = grad._indices()[0], grad._values()
    if device_path(indices):
        return segment_rows(indices, values)
    narrow = indices.int() if grad.shape[0] < 2**31 else indices
    rows, inverse = torch.unique(narrow, return_inverse=True)
    summed = values.new_zeros(rows.numel(), *values.shape[1:]).index_add_(0, inverse, values)
    return rows.long(), summed


def segment_rows(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`unique_rows` in fixed shapes: ``len(indices)`` slots, the distinct rows ascending in the first ones
    with their summed values (summed in the entries' order, as ``unique_rows`` sums), every later slot a copy of
    the last distinct one.

    The copies make a row-wise update safe without knowing the count: a slot that repeats the last row computes
    exactly its new values, so writing them back with ``index_copy_`` writes the same value twice (what fused
    table-batched optimizers do with a padding row, without one). Sort, segment boundaries, a cumulative sum and
    scatters: no op whose output size depends on the data.
    """
    if indices.numel() == 0:
        return indices.long(), values
    sorted_rows, order = torch.sort(indices, stable=True)  # stable: equal rows keep the entries' order
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[1:] = sorted_rows[1:] != sorted_rows[:-1]
    segment = torch.cumsum(starts, 0) - 1  # each entry's slot
    summed = values.new_zeros(values.shape).index_add_(0, segment, values.index_select(0, order))
    rows = torch.empty_like(sorted_rows).scatter_(0, segment, sorted_rows)
    slot = torch.minimum(torch.arange(segment.numel(), device=segment.device), segment[-1])  # past the last: the last
    return rows.index_select(0, slot).long(), summed.index_select(0, slot)


def _add_to_rows(param: Tensor, rows: Tensor, update: Tensor, alpha: float) -> None:
    """``param[rows] += alpha * update``. Rows from :func:`segment_rows` may repeat the last one (with the same
    update): those are written, not added, so the repeats change nothing."""
    if device_path(rows):
        param.index_copy_(0, rows, param.index_select(0, rows).add_(update, alpha=alpha))
    else:
        param.index_add_(0, rows, update, alpha=alpha)


class _RowWise(torch.optim.Optimizer):
    """What the row-wise optimizers share: sparse parameters whose weights are slices of one buffer are updated
    together, through the whole buffer and state buffers sliced the same way (``row_state``)."""

    row_state: dict[str, str] = {}  # state name -> "row" (a value per row) or "param" (the parameter's shape)
    # every count and bias correction on the parameters' device, no host scalar that changes from step to step: a
    # CUDA graph replays device work only (torch's ``capturable=True``); set by the constructor
    capturable = False

    def _step_tensor(self, param: Tensor, state: dict[str, Any]) -> Tensor:
        """The parameter's step count as torch keeps it (a 0-d float32); on the parameter's device when
        ``capturable`` (moved there once where a checkpoint brought it back on the host)."""
        step = state.get("step")
        device = param.device if self.capturable else torch.device("cpu")
        if step is None:
            step = state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        elif self.capturable and step.device != device:
            step = state["step"] = step.to(device)
        return step

    def _sparse(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _dense(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _dense_all(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """The dense-gradient parameters of a group (the MLPs), each by :meth:`_dense`; an optimizer may update
        them together (multi-tensor kernels: a few launches for all instead of several per parameter)."""
        for param in params:
            self._dense(param, self.state[param], group)

    def _initial(self, name: str, group: dict[str, Any]) -> float:
        """The value a state starts at (Adagrad's accumulator may start above zero)."""
        return 0.0

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {
            name: (
                param.new_full(param.shape, self._initial(name, group))
                if kind == "param"
                else torch.full((param.shape[0],), self._initial(name, group), dtype=torch.float32, device=param.device)
            )
            for name, kind in self.row_state.items()
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            shared: dict[tuple, list[Tensor]] = {}  # sparse tables by the buffer their weights are slices of
            dense: list[Tensor] = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse and param.dim() == 2 and param.is_contiguous():
                    key = (param.untyped_storage().data_ptr(), param.dtype, param.shape[1])
                    shared.setdefault(key, []).append(param)
                    continue
                state = self.state[param]
                if param.grad.is_sparse:
                    if not state:
                        state.update(self._new_state(param, group))
                    self._sparse(param, param.grad, state, group)
                else:
                    dense.append(param)
            self._dense_all(dense, group)
            for params in shared.values():
                if len(params) == 1:
                    state = self.state[params[0]]
                    if not state:
                        state.update(self._new_state(params[0], group))
                    self._sparse(params[0], params[0].grad, state, group)
                else:
                    self._packed(params, group)
        return loss

    def _packed(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """One row-wise update of tables that are slices of one buffer, through the whole buffer and its states."""
        first = params[0]
        row_dim = first.shape[1]
        starts = [param.storage_offset() // row_dim for param in params]
        total_rows = first.untyped_storage().nbytes() // (row_dim * first.element_size())
        weight = first.new_empty(0).set_(first.untyped_storage(), 0, (total_rows, row_dim))  # the whole buffer
        indices = torch.cat([param.grad._indices()[0] + start for param, start in zip(params, starts)])  # type: ignore[union-attr]
        values = torch.cat([param.grad._values() for param in params])  # type: ignore[union-attr]
        grad = torch.sparse_coo_tensor(indices.unsqueeze(0), values, weight.shape, check_invariants=False)
        state = self._packed_state(params, starts, total_rows, group)
        assert state is not None
        self._sparse(weight, grad, state, group)
        counts = [self._step_tensor(param, self.state[param]) for param in params if "step" in self.state[param]]
        if counts:  # the per-table counts torch's optimizers keep, in one launch
            torch._foreach_add_(counts, 1.0)

    def _packed_state(
        self,
        params: list[Tensor],
        starts: list[int],
        total_rows: int,
        group: dict[str, Any],
        existing_only: bool = False,
    ) -> dict[str, Tensor] | None:
        """The tables' states as whole buffers whose slices are each table's state. Made again (keeping the values
        the tables had, from a checkpoint say) when they are not such slices; ``existing_only``: None then."""
        first = params[0]
        widths = {name: first.shape[1] if kind == "param" else 1 for name, kind in self.row_state.items()}
        head = self.state[first]

        def packed(name: str) -> bool:
            if name not in head or head[name].untyped_storage().nbytes() != total_rows * widths[name] * 4:
                return False
            storage = head[name].untyped_storage().data_ptr()
            return all(
                name in self.state[param]
                and self.state[param][name].untyped_storage().data_ptr() == storage
                and self.state[param][name].storage_offset() == start * widths[name]
                for param, start in zip(params, starts)
            )

        def shape(name: str) -> tuple[int, ...]:
            return (total_rows, widths[name]) if self.row_state[name] == "param" else (total_rows,)

        if first.dtype == torch.float32 and all(packed(name) for name in widths):
            return {name: head[name].new_empty(0).set_(head[name].untyped_storage(), 0, shape(name)) for name in widths}
        if existing_only:
            return None
        buffers = {
            name: torch.full(
                shape(name),
                self._initial(name, group),
                device=first.device,
                dtype=first.dtype if self.row_state[name] == "param" else torch.float32,
            )
            for name in widths
        }
        for param, start in zip(params, starts):
            state = self.state[param]
            for name, buffer in buffers.items():
                view = buffer[start : start + param.shape[0]]
                if name in state:
                    view.copy_(state[name])
                state[name] = view
            self._new_param_scalars(state)
        return buffers

    def _new_param_scalars(self, state: dict[str, Any]) -> None:
        """Per-parameter scalars a packed table's state needs beside its rows (Adagrad's step)."""

    def _next_step(self, param: Tensor, step: Tensor) -> float:
        """Count a step in ``step`` (the state's tensor, as torch's optimizers keep it) and return the new count
        from a host copy: read from the tensor only when it is not the one last counted (a load replaced it)."""
        known = self.__dict__.setdefault("_host_steps", {}).get(param)
        count = known[1] + 1 if known is not None and known[0] is step else float(step) + 1
        step.fill_(count)
        self._host_steps[param] = (step, count)
        return count


class RowAdam(_RowWise):
    """Adam with row-wise lazy updates for parameters whose gradients are sparse; see the module docstring.

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
        _add_to_rows(param, rows, update, -lr)

    def _dense_all(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Adam's dense update of every parameter whose rows were never reset, with torch's multi-tensor
        (``_foreach``) ops, grouped by step count and device: the arithmetic of :meth:`_dense`, element for element,
        in a few launches for all of them (torch's Adam does the same with ``foreach=True``)."""
        together: dict[tuple, list[Tensor]] = {}
        for param in params:
            state = self.state[param]
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
            grads = [param.grad for param in members]
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
        denominators: list[Tensor],
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


class RowAdagrad(_RowWise):
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
        _add_to_rows(param, rows, values / sums.sqrt().add_(group["eps"]), -group["lr"])

    def _dense(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state.update(self._new_state(param, group))
        self._step_tensor(param, state).add_(1)
        state["sum"].addcmul_(param.grad, param.grad, value=1)
        param.addcdiv_(param.grad, state["sum"].sqrt().add_(group["eps"]), value=-group["lr"])


class RowwiseAdagrad(_RowWise):
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
        _add_to_rows(param, rows, values / scale, -group["lr"])

    def _dense(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state.update(self._new_state(param, group))
        grad = param.grad.reshape(param.shape[0], -1) if param.dim() else param.grad.reshape(1, 1)
        state["sum"].add_(grad.float().pow(2).mean(1))
        shape = (-1,) + (1,) * max(param.dim() - 1, 0)
        param.addcdiv_(param.grad, (state["sum"].sqrt() + group["eps"]).to(param.dtype).view(shape), value=-group["lr"])


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers, each over its own parameters, stepped as one (the MLPs' and the tables' own optimizers,
    as TorchRec's ``CombinedOptimizer`` combines them). ``param_groups`` are the children's groups in order and
    ``state_dict`` numbers their parameters one after another, so it saves and loads as one optimizer does.

    Example::

        >>> mlp, table = torch.nn.Linear(2, 1), torch.nn.Embedding(5, 2, sparse=True)
        >>> both = CombinedOptimizer([RowAdam(mlp.parameters(), lr=1e-3), RowwiseAdagrad(table.parameters(), lr=0.1)])
        >>> [group["lr"] for group in both.param_groups]
        [0.001, 0.1]
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        if not self.optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        # not torch.optim.Optimizer.__init__: the children hold the parameters, groups and state
        self.defaults = {}
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:  # type: ignore[override]
        return {param: value for optimizer in self.optimizers for param, value in optimizer.state.items()}

    def owner(self, param: Tensor) -> torch.optim.Optimizer:
        """The child optimizer that updates ``param``."""
        for optimizer in self.optimizers:
            if any(p is param for group in optimizer.param_groups for p in group["params"]):
                return optimizer
        raise KeyError("the parameter is not in any of the combined optimizers")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of every child (``closure`` is evaluated once, by the first)."""
        loss = None
        for index, optimizer in enumerate(self.optimizers):
            result = optimizer.step(closure if index == 0 else None)
            loss = result if index == 0 else loss
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The children's state dicts as one: their parameters numbered one after another."""
        state, groups, offset = {}, [], 0
        for optimizer in self.optimizers:
            child = optimizer.state_dict()
            state.update({offset + index: value for index, value in child["state"].items()})
            groups += [{**group, "params": [offset + i for i in group["params"]]} for group in child["param_groups"]]
            offset += sum(len(group["params"]) for group in child["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` gave, each child its groups (as many as it has) and their parameters."""
        groups, offset, at = state_dict["param_groups"], 0, 0
        for optimizer in self.optimizers:
            count = len(optimizer.param_groups)
            mine = groups[at : at + count]
            if len(mine) != count:
                raise ValueError("the state dict has fewer parameter groups than the combined optimizers")
            size = sum(len(group["params"]) for group in mine)
            optimizer.load_state_dict(
                {
                    "state": {
                        index - offset: value
                        for index, value in state_dict["state"].items()
                        if offset <= int(index) < offset + size
                    },
                    "param_groups": [{**group, "params": [i - offset for i in group["params"]]} for group in mine],
                }
            )
            at, offset = at + count, offset + size
        if at != len(groups):
            raise ValueError("the state dict has more parameter groups than the combined optimizers")
