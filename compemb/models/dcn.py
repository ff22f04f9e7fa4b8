"""DCN-v2: "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank
Systems", Wang et al. 2021 (arXiv 2008.13535).

The input x0 is the dense features and every embedding, concatenated. Cross layers compute
``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` (full-rank W, the paper's default); the stacked structure feeds the
cross output to a deep MLP, the parallel one concatenates the cross output with a deep MLP of x0. A linear
layer makes the logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from compemb.collection import Bags, EmbeddingCollection
from compemb.models.mlp import mlp


class CrossLayer(torch.nn.Module):
    """One DCN-v2 cross layer: ``x0 * (W x + b) + x``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        """The next cross layer's input."""
        return x0 * self.linear(x) + x


class DCNv2(torch.nn.Module):
    """DCN-v2 over an :class:`~compemb.collection.EmbeddingCollection`.

    Args:
        embeddings: the sparse features' tables.
        num_dense: dense features per sample (13 on Criteo).
        cross_layers: how many cross layers (default 3).
        deep: hidden widths of the deep MLP.
        structure: ``"stacked"`` (cross then deep, default) or ``"parallel"``.

    Shape:
        dense ``(batch, num_dense)`` float, sparse ``(batch, num_features)`` int -> logits ``(batch,)``.
    """

    def __init__(
        self,
        embeddings: EmbeddingCollection,
        num_dense: int = 13,
        cross_layers: int = 3,
        deep: Sequence[int] = (512, 256),
        structure: str = "stacked",
    ) -> None:
        super().__init__()
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be 'stacked' or 'parallel', got {structure!r}")
        width = num_dense + len(embeddings.features) * embeddings.embedding_dim
        self.embeddings = embeddings
        self.structure = structure
        self.cross = torch.nn.ModuleList(CrossLayer(width) for _ in range(cross_layers))
        self.deep = mlp(width, deep)
        head_inputs = deep[-1] if deep else width
        self.head = torch.nn.Linear(head_inputs + (width if structure == "parallel" else 0), 1)

    def forward(self, dense: Tensor, sparse: Tensor, bags: Mapping[str, Bags] | None = None) -> Tensor:
        """Click logits for a batch (apply a sigmoid for probabilities); ``bags``: the multi-hot features' ids."""
        x0 = torch.cat([dense, self.embeddings(sparse, bags).flatten(1)], dim=1)
        crossed = x0
        for layer in self.cross:
            crossed = layer(x0, crossed)
        if self.structure == "stacked":
            return self.head(self.deep(crossed)).squeeze(-1)
        return self.head(torch.cat([crossed, self.deep(x0)], dim=1)).squeeze(-1)
