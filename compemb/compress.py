"""Compress a trained table: fit any method's tables so that it reproduces a given ``(n, d)`` embedding matrix.

The fit minimises the mean squared error between the method's vector of every id and that id's row, over all ids.
For the methods whose output is linear in their parameters (hash, ce, bloom, qr, robe, hashednets, hemb, lowrank
with its projection fixed, ...) that is a least-squares problem, solved by full-batch L-BFGS (the hashing trick's
solution is each bucket's mean row, which the tests check). The other methods (DHE's MLP, TT-Rec's cores) are
fitted the same way to a local minimum. Methods that move rows between ids while they train (CCE's clustering,
CAFE's promotions, AdaEmbed) are fitted by minibatch Adam with their own hooks after every step, so CCE reaches
the dense-CCE fit of the paper's Algorithm 1: least squares on the tables, then the pointers re-clustered from the
vectors, repeated.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from compemb.embeddings.adaptive import AdaptiveEmbedding
from compemb.embeddings.base import CompressedEmbedding
from compemb.registry import make_embedding


@torch.no_grad()
def _error(module: CompressedEmbedding, weight: Tensor, ids: Tensor, chunk: int) -> float:
    total = 0.0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        total += float((module(part) - weight[part]).double().pow(2).sum())
    return total / max(1, weight.numel())


def compress(
    weight: Tensor,
    method: str,
    *,
    compression: float | None = None,
    num_params: int | None = None,
    seed: int = 0,
    steps: int = 200,
    epochs: int = 60,
    batch_size: int = 256,
    lr: float = 0.05,
    **options: Any,
) -> CompressedEmbedding:
    """``method`` (a registered name) built for ``weight``'s shape and budget, its tables fitted to ``weight``.

    Args:
        weight: the trained table, ``(num_embeddings, embedding_dim)``, floating point.
        compression, num_params, seed, options: as :func:`compemb.make_embedding`.
        steps: L-BFGS iterations (methods that do not move rows between ids).
        epochs, batch_size, lr: Adam passes over every id, their batch and learning rate (methods that do).

    The result's ``fit_error`` attribute is the mean squared error per coordinate it reached, and
    ``fit_baseline`` that of the module before fitting (as initialised).

    Example::

        >>> table = torch.randn(1000, 3) @ torch.randn(3, 8)  # ids that share directions
        >>> hashed, clustered = compress(table, "hash", compression=4), compress(table, "cce-paper", compression=4)
        >>> clustered.fit_error < hashed.fit_error < hashed.fit_baseline
        True
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a 2-D floating-point tensor (num_embeddings, embedding_dim)")
    weight = weight.detach()
    n, d = weight.shape
    module = make_embedding(
        method, n, d, compression=compression, num_params=num_params, seed=seed, device=weight.device, **options
    )
    module.to(weight.dtype)
    module.train()
    ids = torch.arange(n, device=weight.device)
    chunk = 1 << 14  # ids per forward when the whole table is evaluated
    baseline = _error(module, weight, ids, chunk)
    parameters: list[Tensor] = [p for p in module.parameters() if p.requires_grad]
    if isinstance(module, AdaptiveEmbedding):
        _fit_adaptive(module, weight, parameters, epochs, batch_size, lr, seed)
    else:
        _fit_least_squares(module, weight, parameters, ids, steps, chunk)
    module.fit_baseline = baseline  # type: ignore[assignment]  # stubs: module attributes are Tensor | Module
    module.fit_error = _error(module, weight, ids, chunk)  # type: ignore[assignment]  # as above
    return module


def _fit_least_squares(
    module: CompressedEmbedding, weight: Tensor, parameters: list[Tensor], ids: Tensor, steps: int, chunk: int
) -> None:
    """Full-batch L-BFGS on the mean squared error (the gradient summed over chunks of ids)."""
    if module.sparse:  # L-BFGS needs dense gradients
        module.sparse = False
    optimizer = torch.optim.LBFGS(
        parameters,
        lr=1,
        max_iter=steps,
        history_size=20,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), dtype=torch.float64, device=weight.device)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            loss = (module(part) - weight[part]).pow(2).sum() / weight.numel()
            loss.backward()
            total += loss.detach().double()
        return total

    optimizer.step(closure)


def _fit_adaptive(
    module: CompressedEmbedding,
    weight: Tensor,
    parameters: list[Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> None:
    """Minibatch Adam over shuffled ids, the method's own hooks (clustering, promotions) after every step."""
    from compemb.optim import RowAdam

    optimizer = RowAdam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n, step = weight.shape[0], 0
    total_steps = epochs * math.ceil(n / batch_size)
    module.on_train_begin(total_steps, math.ceil(n / batch_size))
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(weight.device)
        for start in range(0, n, batch_size):
            part = order[start : start + batch_size]
            optimizer.zero_grad()
            (module(part) - weight[part]).pow(2).mean().backward()
            optimizer.step()
            module.on_step_end(step, optimizer)
            step += 1
