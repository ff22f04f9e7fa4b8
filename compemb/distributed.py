"""Many processes on torch.distributed: joining torchrun's process group, and the collectives compemb's own state needs.

Gradients are DistributedDataParallel's business; what compemb adds keeps the adaptive state identical on every
rank without a layer of its own:

- every rank reads its own contiguous slice of each global batch (:func:`shard`), in rank order, so the ranks'
  slices concatenated are the batch a single process would read;
- a sketch changes only through ids and scores gathered from every rank (:func:`gather_scored`), concatenated in
  rank order: every rank applies the same updates in the same order, the very updates one process applies to the
  whole batch;
- clustering runs on every rank from the same state and seed, and rank 0's result is broadcast
  (:func:`broadcast_state`), so no difference of floating-point order between processes can grow.

In one process (no process group) every function here is the identity, so the single-process path is unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT = timedelta(minutes=30)  # a rank waiting this long for the others gives up (a crashed peer, say)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (its ``WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def init(device: str) -> torch.device:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) and return the device this rank trains on.

    ``device`` is the run's device: ``"cuda"`` puts rank ``LOCAL_RANK`` on GPU ``LOCAL_RANK``; ``"cpu"`` stays.
    """
    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", timeout=TIMEOUT)
    return where


def shard(start: int, stop: int) -> tuple[int, int]:
    """This rank's contiguous part of rows ``[start, stop)``: sizes differ by at most one, lower ranks first."""
    size, world, me = stop - start, world_size(), rank()
    return start + size * me // world, start + size * (me + 1) // world


def gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (the ranks' lengths may differ)."""
    if not active():
        return tensor
    world = world_size()
    length = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n) for n in torch.cat(lengths).tolist()]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))  # all_gather moves tensors of one shape
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def gather_scored(ids: Tensor, scores: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Every rank's ids (and float scores, one per id) concatenated in rank order, in one collective."""
    if not active():
        return ids, scores
    if scores is None:
        return gather_rows(ids.reshape(-1)), None
    # the float32 scores travel bit for bit beside the int64 ids: one message instead of two
    bits = scores.reshape(-1).float().view(torch.int32).to(torch.int64)
    both = gather_rows(torch.stack([ids.reshape(-1).to(torch.int64), bits], dim=1))
    return both[:, 0], both[:, 1].to(torch.int32).view(torch.float32)


def broadcast_state(module: torch.nn.Module, source: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``source``'s, in place."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, source)


# sparse table gradients of up to this many floats in all are summed densely, in the one all-reduce of the dense
# ones: a compressed table is small, and one collective costs less than one sparse all-reduce per table (measured:
# 26 per-feature tables at 100x, 216 ms a step in gloo's sparse all-reduces against a few ms for one dense one)
DENSE_REDUCE_FLOATS = 1 << 23


def average_gradients(parameters: Sequence[Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in one all-reduce where the tables are small.

    For the tables DDP cannot bucket (it expects sparse gradients only from ``nn.Embedding``). A sparse gradient
    stays sparse: it comes back coalesced, over the rows any rank touched (a per-row count travels with the sums,
    so a row touched with a zero gradient is still touched, as row-wise optimizers need). Sparse tables larger
    than ``DENSE_REDUCE_FLOATS`` in all go through gloo's sparse all-reduce, one per table. Every rank ends with
    the same gradients.
    """
    if not active():
        return
    world = world_size()
    with_grad = [(p, p.grad) for p in parameters if p.grad is not None]  # (parameter, its gradient)
    sparse = [(p, grad) for p, grad in with_grad if grad.is_sparse]
    dense = [(p, grad) for p, grad in with_grad if not grad.is_sparse]
    if sum(p.numel() + p.shape[0] for p, _ in sparse) > DENSE_REDUCE_FLOATS:
        for _, grad in sparse:
            dist.all_reduce(grad)  # gloo: every rank's rows, summed and coalesced, in place
            grad.mul_(1.0 / world)
        sparse = []
    parts = [grad.reshape(-1) for _, grad in dense]
    for param, grad in sparse:
        touched = torch.zeros(param.shape[0], dtype=grad.dtype, device=grad.device)
        touched[grad._indices()[0]] = 1.0
        parts += [grad.to_dense().reshape(-1), touched]
    if not parts:
        return
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    flat.mul_(1.0 / world)
    pieces = iter(flat.split([part.numel() for part in parts]))
    for _, grad in dense:
        grad.copy_(next(pieces).view_as(grad))
    for param, _ in sparse:
        summed, touched = next(pieces).view_as(param), next(pieces)
        rows = touched.nonzero().squeeze(1)
        param.grad = torch.sparse_coo_tensor(
            rows.unsqueeze(0), summed.index_select(0, rows), param.shape, is_coalesced=True
        )


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the ranks, in place (and returned)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank is here."""
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (when one is running)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still waits on a collective
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> None:
    """Leave the process group and end this rank's process at once, without Python's teardown.

    Under torchrun, freeing a DistributedDataParallel reducer at exit can deadlock with gloo (torch 2.13): its
    process group's destructor joins the gloo worker threads while holding the GIL, and a worker thread that is
    releasing its last finished collective waits for the GIL (seen with py-spy: ``~ProcessGroupGloo`` in
    ``std::thread::join`` beside ``~AsyncAllgatherWork`` in ``gil_scoped_acquire``). Output is flushed first.
    """
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
