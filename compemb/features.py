"""What an :class:`~compemb.collection.EmbeddingCollection` reads: its features (:class:`Feature`: a name, a
number of ids, one-hot or pooled) and a multi-hot feature's ids for a batch (:class:`Bags`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POOLINGS = ("sum", "mean")


@dataclass(frozen=True)
class Feature:
    """A categorical feature: its name, how many ids it has, and how a row's ids are pooled.

    ``pooling=None`` (one-hot, as Criteo's): one id per row, a column of the collection's ``ids``.
    ``"sum"`` / ``"mean"`` (multi-hot, e.g. a user's last k items): a bag of ids per row, given as :class:`Bags`
    and reduced to one vector (an empty bag gives zeros).
    """

    name: str
    num_embeddings: int
    pooling: str | None = None

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"feature {self.name!r}: pooling must be None or one of {POOLINGS}, got {self.pooling!r}")


@dataclass(frozen=True)
class Bags:
    """A multi-hot feature's ids for a batch, laid out as a KeyedJaggedTensor carries one feature.

    Row b's bag is ``values[offsets[b]:offsets[b + 1]]``: ``offsets`` has ``batch + 1`` entries, from 0 to
    ``len(values)``. ``weights`` (optional, the shape of ``values``) scale each id's vector (sum pooling only).
    """

    values: Tensor
    offsets: Tensor
    weights: Tensor | None = None

    @classmethod
    def from_offsets(
        cls, values: Tensor, offsets: Tensor, weights: Tensor | None = None, *, include_last_offset: bool = False
    ) -> Bags:
        """Bags from nn.EmbeddingBag's offsets: one per bag (``include_last_offset=False``, the bags then end at
        ``len(values)``), or one per bag and a last one that must be ``len(values)``.

        Example::

            >>> Bags.from_offsets(torch.arange(5), torch.tensor([0, 2])).offsets.tolist()
            [0, 2, 5]
        """
        if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.is_floating_point():
            raise ValueError("bag offsets must be a 1-D integer tensor")
        if include_last_offset:
            if len(offsets) == 0 or int(offsets[-1]) != len(values):
                last = int(offsets[-1]) if len(offsets) else None
                raise ValueError(
                    f"with include_last_offset, offsets[-1] must be len(values) = {len(values)}, got {last}"
                )
            return cls(values, offsets.long(), weights)
        end = torch.tensor([len(values)], dtype=torch.int64, device=offsets.device)
        return cls(values, torch.cat([offsets.long(), end]), weights)

    @classmethod
    def from_lengths(cls, values: Tensor, lengths: Tensor, weights: Tensor | None = None) -> Bags:
        """Bags from per-row lengths (as KJTs also carry them) instead of offsets."""
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths.long(), 0, out=offsets[1:])
        return cls(values, offsets, weights)
