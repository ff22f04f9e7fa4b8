"""What a CCE table counts between clusterings, so that the next one can choose its ids
(:func:`~compemb.embeddings.cce.schedule.cluster_sample`, :func:`~compemb.embeddings.cce.schedule.top_holders`): a
strided sample of each training batch in its HotSketch (:func:`insert_sample`), every id in its seen bitmap
(:func:`mark_seen_ids`)."""

from __future__ import annotations

import torch
from torch import Tensor

from compemb.embeddings.cce.kernels import mark_seen
from compemb.kernels import on_host
from compemb.sketch.hotsketch import HotSketch


def insert_sample(sketch: HotSketch, ids: Tensor, scores: Tensor | None, stride: int) -> None:
    """Insert one occurrence in ``stride`` of ``ids`` (with their ``scores``; None: frequency) into ``sketch``,
    each weighted ``stride``: Space-Saving finds the heavy hitters from a sample."""
    if stride > 1 and sketch.mass_on_device:  # the same sample, its start read on the device
        _insert_strided_on_device(sketch, ids, scores, stride)
    elif stride > 1:  # a strided sample, starting where the sketch's saved mass says: it moves every batch
        start = int(sketch.mass_since_decay()) % stride  # a host float: no read from the device
        sample = ids[start::stride]
        scores = (
            torch.full(sample.shape, float(stride), device=ids.device)
            if scores is None
            else scores[start::stride] * stride
        )
        # (scores of mean 1 per batch: the decay counts occurrences, exactly; see HotSketch.insert's mass)
        sketch.insert(sample, scores, mass=float(sample.numel() * stride))
    else:
        sketch.insert(ids, scores, mass=float(ids.numel()))


def _insert_strided_on_device(sketch: HotSketch, ids: Tensor, scores: Tensor | None, stride: int) -> None:
    """:func:`insert_sample`'s strided sample with its start (the sketch's mass mod ``stride``) on the device: the
    same entries, in fixed shapes (positions past the batch kept out of the insert, not cut off)."""
    flat = ids.reshape(-1)
    positions = (sketch.mass.long() % stride) + torch.arange(-(-flat.numel() // stride), device=ids.device) * stride
    keep = positions < flat.numel()
    positions = positions.clamp_max(flat.numel() - 1)
    weights = (
        torch.full(positions.shape, float(stride), device=ids.device)
        if scores is None
        else scores.reshape(-1)[positions] * stride
    )
    sketch.insert(flat[positions], weights, mass=keep.sum(dtype=torch.float64) * stride, keep=keep)


def mark_seen_ids(seen: Tensor, ids: Tensor) -> None:
    """Set ``ids``' bits in the ``seen`` bitmap (uint8, bit ``id & 7`` of byte ``id >> 3``)."""
    if on_host(seen):
        mark_seen(ids.cpu().numpy(), seen.numpy())
    else:
        ids = ids.to(seen.device)
        byte, bit = ids >> 3, ids & 7
        for b in range(8):  # one bit plane at a time: writes to one byte then all write the same value
            at = byte[bit == b]
            seen[at] = seen[at] | (1 << b)
