"""Several optimizers, each over its own parameters, stepped, saved and loaded as one."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers, each over its own parameters, stepped as one (the MLPs' and the tables' own optimizers,
    as TorchRec's ``CombinedOptimizer`` combines them). ``param_groups`` are the children's groups in order and
    ``state_dict`` numbers their parameters one after another, so it saves and loads as one optimizer does.

    Example::

        >>> from compemb.optim import RowAdam, RowwiseAdagrad
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
        # ordered dicts, as torch's own: its register_*_hook methods keep weak references to them and move a
        # prepended hook to the front
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

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
        """One step of every child (``closure`` is evaluated once, by the first), between the step hooks registered
        on this optimizer (``register_step_pre_hook`` / ``register_step_post_hook``), as torch's optimizers run them."""
        args: tuple[Any, ...] = (closure,)
        kwargs: dict[str, Any] = {}
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            changed = pre_hook(self, args, kwargs)
            if changed is not None:
                args, kwargs = changed
        closure = args[0] if args else kwargs.get("closure")
        loss = None
        for index, optimizer in enumerate(self.optimizers):
            result = optimizer.step(closure if index == 0 else None)
            loss = result if index == 0 else loss
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, args, kwargs)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The children's state dicts as one: their parameters numbered one after another (the state-dict hooks
        registered on this optimizer run around it, as torch's do)."""
        for pre_hook in list(self._optimizer_state_dict_pre_hooks.values()):
            pre_hook(self)
        state, groups, offset = {}, [], 0
        for optimizer in self.optimizers:
            child = optimizer.state_dict()
            state.update({offset + index: value for index, value in child["state"].items()})
            groups += [{**group, "params": [offset + i for i in group["params"]]} for group in child["param_groups"]]
            offset += sum(len(group["params"]) for group in child["param_groups"])
        combined: dict[str, Any] = {"state": state, "param_groups": groups}
        for post_hook in list(self._optimizer_state_dict_post_hooks.values()):
            combined = post_hook(self, combined) or combined
        return combined

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` gave, each child its groups (as many as it has) and their parameters (the
        load hooks registered on this optimizer run around it, as torch's do)."""
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            state_dict = pre_hook(self, state_dict) or state_dict
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
        for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)
