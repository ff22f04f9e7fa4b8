"""What the row-wise optimizers of :mod:`compemb.optim` share: the step that sorts parameters into sparse, dense and
packed ones, the tables packed in one buffer updated together through state buffers packed the same way, and the
step counts (on the host, or on the device for a CUDA graph)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class RowWiseOptimizer(torch.optim.Optimizer):
    """What the row-wise optimizers share: sparse parameters whose weights are slices of one buffer are updated
    together, through the whole buffer and state buffers sliced the same way (``row_state``)."""

    row_state: dict[str, str] = {}  # state name -> "row" (a value per row) or "param" (the parameter's shape)
    # every count and bias correction on the parameters' device, no host scalar that changes from step to step: a
    # CUDA graph replays device work only (torch's ``capturable=True``); set by the constructor
    capturable = False
    # parameter -> (its step tensor, the count last written to it): set on first use (see _next_step)
    _host_steps: dict[Tensor, tuple[Tensor, float]]

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
                    grad = params[0].grad
                    assert grad is not None  # shared holds parameters with a gradient only
                    self._sparse(params[0], grad, state, group)
                else:
                    self._packed(params, group)
        return loss

    def _packed(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """One row-wise update of tables that are slices of one buffer, through the whole buffer and its states."""
        first = params[0]
        row_dim = first.shape[1]
        starts = [param.storage_offset() // row_dim for param in params]
        total_rows = first.untyped_storage().nbytes() // (row_dim * first.element_size())
        # the whole buffer
        weight = first.new_empty(0).set_(first.untyped_storage(), 0, (total_rows, row_dim))  # type: ignore[call-overload]  # torch's stub wants a stride, set_ defaults it
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
