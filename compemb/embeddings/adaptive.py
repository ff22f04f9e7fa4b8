"""What the adaptive methods (CAFE, CAFE-ML, AdaEmbed, CCE) share: importance recorded from the output gradient,
updates applied after the optimizer step, and fresh optimizer state for rows that change owner.

**Importance.** :class:`AdaptiveEmbedding` puts a hook on its own lookup output: an occurrence scores the L2 norm
of its output gradient, normalised to mean 1 over the batch (or 1, with ``importance="frequency"``). The hook only
records; the method's ``_update`` (sketch inserts, promotions, reallocation) runs in ``on_step_end(step,
optimizer)``, which the Trainer calls after ``optimizer.step()``, or else at the start of the next training
forward, so a plain loop needs no change. Reads have no side effects: a forward in eval mode leaves what is
pending where it is, and ``state_dict()`` returns the state with it applied to a copy: a checkpoint taken after
a plain loop's step holds what the next forward would apply, and the module trains on exactly as without the read.

**Optimizer rows.** CAFE promotes an id to a hot row, CCE replaces its tables at every clustering: the row then
serves a new owner and must forget what the optimizer learned of the old one. Zeroing the row's state is enough
for SGD (a zero momentum buffer restarts as torch starts one: the first gradient) and Adagrad (a zero sum gives the
first update ``lr * g / |g|``, as for a new parameter). Adam is different: its bias correction divides by
``1 - beta^t`` with the *shared* step count ``t``, so a zeroed row at a late step gets ``m = 0.1 g`` and
``sqrt(v) = 0.032 |g|`` uncorrected: a first update of ~3.2 x lr instead of lr.

The rule here for Adam and AdamW: every reset row remembers the step it was reset at (``row_reset_step`` in the
optimizer's state of the parameter, so checkpoints keep it), and a hook after each optimizer step replaces the
update torch applied to those rows with the one Adam would apply at the row's own age ``a = t - reset``:
``lr * (m / (1 - b1^a)) / (sqrt(v / (1 - b2^a)) + eps)``. Moments are unchanged (they do not depend on the step),
so the row then trains exactly as a parameter created at its reset. Rows drop out of the correction once both
bias corrections agree with the shared ones (``b^a < 1e-7``). torch's SparseAdam is lazy (a row's moments move
only when it has a gradient), so a fresh SparseAdam parameter counts only the steps it took part in: its reset rows
count their own updates (``row_updates_since_reset``), and a hook after each step gives the rows the step touched the
update at that count (measured before: a first update of 3.08 x lr; now lr, as a new parameter's). compemb's RowAdam (the Trainer's
``adam``) counts steps per row for sparse gradients, so a reset zeroes the row's count with its moments; for dense
gradients it reads ``row_reset_step`` itself and corrects the rows in its own update (no hook).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, TypeVar, overload

import torch
from torch import Tensor

from compemb import distributed
from compemb.budget import MemoryReport
from compemb.embeddings.base import CompressedEmbedding
from compemb.kernels import device_path

# ROW_STEP_KEY: per-row step a row's Adam state was reset at
from compemb.optim import ROW_STEP_KEY, CombinedOptimizer, RowAdam, RowwiseAdagrad

IMPORTANCE = ("gradient", "frequency")
_SETTLED = 1e-7  # beta^age below this: the shared bias correction is the row's own
_Destination = TypeVar("_Destination", bound=dict[str, Any])  # nn.Module.state_dict's destination=

ROW_UPDATES_KEY = "row_updates_since_reset"  # SparseAdam: each reset row's own updates since its reset; -1: settled


def _is_adam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Adam)  # AdamW subclasses Adam


@torch.no_grad()
def reset_optimizer_rows(
    optimizer: torch.optim.Optimizer | None, param: Tensor, rows: Tensor, where: Tensor | None = None
) -> None:
    """Give ``rows`` of ``param`` the optimizer state of a row that was never trained.

    ``where`` (optional bools, ``rows``' shape): reset only those of ``rows`` (then ``rows`` must be distinct), in
    fixed shapes, without reading anything back (the device code path's promotions).

    Every state tensor shaped like ``param`` (Adam's ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, Adagrad's
    ``sum``, momentum buffers), dense or sparse, and row-wise Adagrad's per-row ``sum``, gets those rows set to
    their initial value: zero, or Adagrad's ``initial_accumulator_value`` for ``sum``. Under a
    :class:`~compemb.optim.CombinedOptimizer` the optimizer that holds ``param`` does it. For Adam and AdamW the
    rows also restart their own step count (see the module docstring), so their next update is a first update, no
    larger than a new parameter's.

    Example::

        >>> weight = torch.nn.Parameter(torch.ones(4, 2))
        >>> adam = torch.optim.Adam([weight], lr=0.1)
        >>> for _ in range(50):
        ...     weight.grad = torch.ones(4, 2); adam.step()
        >>> reset_optimizer_rows(adam, weight, torch.tensor([0]))
        >>> before = weight.detach().clone(); weight.grad = torch.ones(4, 2); adam.step()
        >>> round(float(before[0, 0] - weight.detach()[0, 0]), 4)  # the reset row moves by lr, as on a first step
        0.1
    """
    if isinstance(optimizer, CombinedOptimizer):  # the tables' own optimizer beside the MLPs'
        try:
            optimizer = optimizer.owner(param)
        except KeyError:
            return
    if optimizer is None or rows.numel() == 0 or param not in optimizer.state:
        return
    if where is not None and any(isinstance(v, Tensor) and v.is_sparse for v in optimizer.state[param].values()):
        rows, where = rows[where], None  # sparse states (torch's SparseAdam) are rebuilt from the chosen rows
    state = optimizer.state[param]
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    for key, value in list(state.items()):
        per_row = isinstance(optimizer, RowwiseAdagrad) and key == "sum"  # one value per row
        if (
            key in (ROW_STEP_KEY, ROW_UPDATES_KEY)
            or not isinstance(value, Tensor)
            or value.dim() == 0
            or (value.shape != param.shape and not per_row)
        ):
            continue
        fill = float(group.get("initial_accumulator_value", 0.0)) if key == "sum" else 0.0
        index = rows.to(value.device, torch.long)
        if value.is_sparse:
            value = value.coalesce()
            keep = ~torch.isin(value.indices()[0], index)
            state[key] = torch.sparse_coo_tensor(value.indices()[:, keep], value.values()[keep], value.shape)
            if fill:
                filled = torch.zeros(index.numel(), *value.shape[1:], dtype=value.dtype, device=value.device) + fill
                state[key] = (state[key] + torch.sparse_coo_tensor(index.unsqueeze(0), filled, value.shape)).coalesce()
        else:
            _fill_rows(value, index, fill, where)
    if "row_steps" in state:  # compemb.optim.RowAdam: the rows' own update counts restart too
        _fill_rows(state["row_steps"], rows.to(state["row_steps"].device, torch.long), 0.0, where)
    if (_is_adam(optimizer) or isinstance(optimizer, RowAdam)) and "step" in state and param.dim() >= 1:
        track_row_steps(optimizer)  # torch's Adam: a hook corrects the rows; RowAdam's dense update reads them itself
        if ROW_STEP_KEY not in state:
            state[ROW_STEP_KEY] = torch.full((param.shape[0],), -1.0, device=param.device)
        _fill_rows(state[ROW_STEP_KEY], rows.to(param.device, torch.long), float(state["step"]), where)
    if isinstance(optimizer, torch.optim.SparseAdam) and "step" in state:
        track_row_steps(optimizer)
        if ROW_UPDATES_KEY not in state:
            state[ROW_UPDATES_KEY] = torch.full((param.shape[0],), -1.0, device=param.device)
        _fill_rows(state[ROW_UPDATES_KEY], rows.to(param.device, torch.long), 0.0, where)


@torch.no_grad()
def reset_packed_rows(
    optimizer: torch.optim.Optimizer | None, weights: Sequence[Tensor], rows: Tensor, where: Tensor | None = None
) -> bool:
    """:func:`reset_optimizer_rows` for tables whose weights are slices of one buffer (a table batch), ``rows``
    numbered in that buffer: one reset over the row-wise optimizer's packed state buffers for all of them, instead
    of one per table. False (nothing done) where it cannot: another optimizer, a table without state yet, or
    states not side by side; the caller then resets table by table."""
    from compemb.optim import RowWiseOptimizer

    if isinstance(optimizer, CombinedOptimizer):
        try:
            optimizer = optimizer.owner(weights[0])
        except KeyError:
            return False
    if not isinstance(optimizer, RowWiseOptimizer) or not weights or any(not optimizer.state.get(w) for w in weights):
        return False
    first = weights[0]
    if first.dim() != 2 or any(
        w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        or w.dim() != 2
        or w.shape[1] != first.shape[1]
        for w in weights
    ):
        return False
    row_dim = first.shape[1]
    group = next(g for g in optimizer.param_groups if any(p is first for p in g["params"]))
    starts = [w.storage_offset() // row_dim for w in weights]
    total_rows = first.untyped_storage().nbytes() // (row_dim * first.element_size())
    # the tables' states as the sparse updates keep them, side by side (dense-gradient states are not: their
    # resets also restart the rows' ages, table by table)
    buffers = optimizer._packed_state(list(weights), starts, total_rows, group, existing_only=True)
    if buffers is None:
        return False
    index = rows.to(first.device, torch.long)
    for name, buffer in buffers.items():
        _fill_rows(buffer, index, optimizer._initial(name, group), where)
    return True


def _fill_rows(value: Tensor, index: Tensor, fill: float, where: Tensor | None) -> None:
    """``value[index] = fill``, or only where ``where`` says (distinct ``index``: the others are written unchanged)."""
    if where is None:
        value.index_fill_(0, index, fill)
        return
    keep = where.to(value.device).view((-1,) + (1,) * (value.dim() - 1))
    value.index_copy_(0, index, torch.where(keep, torch.full_like(value[:1], fill), value.index_select(0, index)))


def track_row_steps(optimizer: torch.optim.Optimizer) -> None:
    """Install (once) the hook that gives reset rows of an Adam/AdamW ``optimizer`` their own step count.

    :func:`reset_optimizer_rows` installs it; call it yourself on an optimizer rebuilt from a checkpoint whose
    state holds reset rows (the Trainer does). SparseAdam gets its own hook (each row's own update count); other
    optimizers need no hook and are left alone.
    """
    if getattr(optimizer, "_compemb_row_steps", False):
        return
    if _is_adam(optimizer):
        optimizer.register_step_post_hook(_correct_reset_rows)
    elif isinstance(optimizer, torch.optim.SparseAdam):
        optimizer.register_step_post_hook(_correct_sparse_adam_rows)
    else:
        return
    optimizer._compemb_row_steps = True  # type: ignore[attr-defined]


@torch.no_grad()
def _correct_sparse_adam_rows(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """After a SparseAdam step: the reset rows it touched get the update at their own count of updates.

    SparseAdam moves a touched row by ``lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)`` at the shared step t;
    a row reset a updates ago gets the same with ``a`` for ``t``, as a parameter created at its reset.
    """
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps = float(group["lr"]), float(group["eps"])
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            counts = state.get(ROW_UPDATES_KEY)
            if counts is None or param.grad is None or not param.grad.is_sparse:
                continue
            touched = param.grad.coalesce().indices()[0]
            rows = touched[counts[touched] >= 0]
            if rows.numel() == 0:
                continue
            counts[rows] += 1
            step, age = float(state["step"]), counts[rows].double()
            shape = (-1,) + (1,) * (param.dim() - 1)
            direction = state["exp_avg"][rows].double() / (state["exp_avg_sq"][rows].double().sqrt() + eps)
            applied = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            own = (lr * torch.sqrt(1 - beta2**age) / (1 - beta1**age)).view(shape)
            param.index_add_(0, rows, ((applied - own) * direction).to(param.dtype))
            settled = (beta1**age < _SETTLED) & (beta2**age < _SETTLED)
            counts[rows[settled.to(rows.device)]] = -1.0


@torch.no_grad()
def _correct_reset_rows(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """After an Adam step: swap the shared-step update of reset rows for the update at each row's own age."""
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps = float(group["lr"]), float(group["eps"])
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            reset_at = state.get(ROW_STEP_KEY)
            if reset_at is None or "exp_avg" not in state:
                continue
            rows = (reset_at >= 0).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            step = float(state["step"])
            age = (step - reset_at[rows]).clamp_min(1).double()
            second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            m, v = state["exp_avg"][rows].double(), second[rows].double().sqrt()
            shape = (-1,) + (1,) * (param.dim() - 1)

            applied = _adam_update(lr, m, v, eps, 1 - beta1**step, 1 - beta2**step)
            own = _adam_update(lr, m, v, eps, (1 - beta1**age).view(shape), (1 - beta2**age).view(shape))
            param.index_add_(0, rows, (applied - own).to(param.dtype))
            settled = (beta1**age < _SETTLED) & (beta2**age < _SETTLED)
            reset_at[rows[settled.to(rows.device)]] = -1.0


def _adam_update(lr: float, m: Tensor, v: Tensor, eps: float, c1: Tensor | float, c2: Tensor | float) -> Tensor:
    """Adam's step of rows with first moments ``m``, square-rooted second ``v`` and bias corrections ``c1``, ``c2``."""
    return lr / c1 * m / (v / torch.sqrt(torch.as_tensor(c2, dtype=torch.float64)) + eps)


def memory_report(module: torch.nn.Module, sketch: tuple[str, ...] = (), floats: tuple[str, ...] = ()) -> MemoryReport:
    """Every parameter and buffer once: parameters (and ``floats`` buffers) as floats, ``sketch`` prefixes as sketch."""
    counts = {"float": 0, "index": 0, "sketch": 0}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        kind = "float" if isinstance(tensor, torch.nn.Parameter) or name in floats else "index"
        kind = "sketch" if name.startswith(sketch) and sketch else kind
        counts[kind] += tensor.numel() * tensor.element_size()
    return MemoryReport(float_bytes=counts["float"], index_bytes=counts["index"], sketch_bytes=counts["sketch"])


def _join(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class AdaptiveEmbedding(CompressedEmbedding):
    """Records per-occurrence importance from a hook on the lookup's output; applies it after the optimizer step.

    A subclass calls ``_start_recording(importance)`` in ``__init__`` and implements ``_vectors(ids)`` (the lookup)
    and ``_update(ids, scores, optimizer)`` (what the recorded importance changes; ``scores`` is None for
    frequency). See the module docstring for when updates run.
    """

    weight: torch.nn.Parameter

    def _start_recording(self, importance: str) -> None:
        if importance not in IMPORTANCE:
            raise ValueError(f"{self.method_name}: importance must be one of {IMPORTANCE}, got {importance!r}")
        self.importance = importance
        self._pending: list[tuple[Tensor, Tensor | None]] = []
        self._pending_gathered = False  # gather_pending has put every rank's occurrences in _pending already

    def _vectors(self, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def _update(self, ids: Tensor, scores: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
        raise NotImplementedError

    def _normalise(self, ids: Tensor, norms: Tensor) -> Tensor | None:
        """One backward's gradient norms as scores of mean 1 over the batch (None: no signal in it).

        On the device code path the mean stays on the device: a batch without signal (zero or diverged norms)
        scores 0 everywhere instead of being skipped: it adds to no score (in a sketch its new ids may still take
        empty slots, at score 0).
        """
        if device_path(norms):
            mean = norms.float().mean()
            usable = torch.isfinite(mean) & (mean > 0)
            return torch.where(usable, norms.float() / torch.where(usable, mean, 1.0), 0.0)
        host_mean = float(norms.mean())
        if not (math.isfinite(host_mean) and host_mean > 0):
            return None
        return norms.float() / host_mean

    def lookup(self, ids: Tensor) -> Tensor:
        if self.training:  # a plain loop never calls on_step_end: what the last backward recorded applies now
            self._flush()
        vectors = self._vectors(ids)
        if self.training and vectors.requires_grad:
            vectors.register_hook(lambda grad: self._record(ids, grad))
        return vectors

    def _record(self, ids: Tensor, grad: Tensor | None) -> None:
        # only remember (one kernel: the norms): tables must not change during backward, nor before the step.
        # An empty batch is remembered too: under torchrun every rank must gather as often as the others
        if grad is None:  # None: autograd passes an undefined gradient
            return
        norms = None if self.importance == "frequency" else torch.linalg.vector_norm(grad.detach(), dim=-1)
        self._pending.append((ids, norms))

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply the importance recorded since the last call; ``optimizer`` lets moved rows forget their state."""
        self._flush(optimizer)

    @torch.no_grad()
    def _flush(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        gathered, self._pending_gathered = self._pending_gathered, False
        id_parts, score_parts = [], []
        for ids, norms in pending:
            # under torchrun: every rank's occurrences, in rank order, so every rank applies the same updates (the
            # ones one process would apply to the whole batch) and the norms are normalised over the whole batch
            if not gathered:
                ids, norms = distributed.gather_scored(ids, norms)
            if ids.numel() == 0:
                continue
            if norms is not None:  # each backward's norms, normalised to mean 1
                scores = self._normalise(ids, norms)
                if scores is None:  # no gradient, or a diverged one: no signal
                    continue
                score_parts.append(scores)
            id_parts.append(ids)
        if id_parts:
            scores = None if self.importance == "frequency" else _join(score_parts)
            self._update(_join(id_parts), scores, optimizer)

    @overload  # nn.Module.state_dict's two forms
    def state_dict(self, *, destination: _Destination, prefix: str = ..., keep_vars: bool = ...) -> _Destination: ...

    @overload
    def state_dict(self, *, prefix: str = ..., keep_vars: bool = ...) -> dict[str, Any]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The module's state with what is pending applied, as the next training forward would apply it.

        Reading changes nothing: pending updates are applied to a copy, whose state is returned (so with
        ``keep_vars=True`` the tensors are the copy's). Without pending updates (the Trainer applies them after
        every step) this is ``nn.Module.state_dict``. Under torchrun, read it with nothing pending (after
        ``on_step_end``): applying pending updates gathers from every rank, which a read on one rank cannot.
        """
        if not self._pending:
            return super().state_dict(*args, **kwargs)
        ahead = copy.deepcopy(self)
        ahead._flush()
        return ahead.state_dict(*args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self._pending, self._pending_gathered = [], False  # recorded against the state being replaced
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@torch.no_grad()
def gather_pending(modules: list[torch.nn.Module]) -> None:
    """Under torchrun: every adaptive module's pending importance from every rank, in one collective for all.

    Each module's ``_flush`` would otherwise gather each of its pending parts on its own (2 collectives each: 26
    per-feature CAFE tables, 52 a step). The gathered parts are the same rows in the same order (rank order, then
    each rank's order), so the updates are exactly those of per-part gathers. Call after backward, before
    ``on_step_end``; in one process it does nothing.
    """
    if not distributed.active():
        return
    adaptive = [m for m in modules if isinstance(m, AdaptiveEmbedding) and m._pending and not m._pending_gathered]
    parts = [(m, ids, norms) for m in adaptive for ids, norms in m._pending]
    if not parts:
        return
    device = parts[0][1].device
    rows = []
    for tag, (_, ids, norms) in enumerate(parts):  # (id, the score's float32 bits, which part) per occurrence
        bits = (
            torch.zeros_like(ids, dtype=torch.int64)
            if norms is None
            else norms.reshape(-1).float().view(torch.int32).to(torch.int64)
        )
        rows.append(torch.stack([ids.reshape(-1).to(torch.int64), bits, torch.full_like(bits, tag)], dim=1))
    every = distributed.gather_rows(torch.cat(rows).to(device))
    order = torch.argsort(every[:, 2], stable=True)  # by part, keeping rank order within each
    sizes = torch.bincount(every[:, 2], minlength=len(parts)).tolist()
    pieces = every.index_select(0, order).split(sizes)
    for module in adaptive:
        module._pending, module._pending_gathered = [], True
    for (module, _, norms), piece in zip(parts, pieces):
        scores = None if norms is None else piece[:, 1].to(torch.int32).view(torch.float32)
        module._pending.append((piece[:, 0], scores))


def end_step(
    modules: Sequence[torch.nn.Module],
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Sequence[object] = (),
) -> None:
    """What follows the optimizer step: under torchrun every table's recorded importance gathered in one
    collective, the table batches that update their tables together (``apply_pending``: per-feature CAFE tables
    on a device, :mod:`compemb.embeddings.cafe.batch`) applied, then every module's ``on_step_end``."""
    gather_pending(list(modules))
    for batch in batches:
        apply = getattr(batch, "apply_pending", None)
        if apply is not None:
            apply(optimizer)
    for module in modules:
        module.on_step_end(step, optimizer)  # type: ignore[operator]
