"""DLRM: "Deep Learning Recommendation Model for Personalization and Recommendation Systems",
Naumov et al. 2019 (arXiv 1906.00091).

Dense features go through the bottom MLP to a vector of the embedding dim; it and every feature's embedding
interact by pairwise dot products (each unordered pair once, no self-products); the products and the dense
vector go through the top MLP to one logit. Defaults are the Criteo Kaggle reference: dim 16, bottom
13-512-256-64-16, top 512-256-1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from compemb.collection import Bags, EmbeddingCollection
from compemb.models.mlp import mlp


class DLRM(torch.nn.Module):
    """DLRM with dot interactions over an :class:`~compemb.collection.EmbeddingCollection`.

    Args:
        embeddings: the sparse features' tables (their dim is the interaction dim).
        num_dense: dense features per sample (13 on Criteo).
        bottom: hidden widths of the bottom MLP; it ends in the embedding dim.
        top: hidden widths of the top MLP; it ends in one logit.

    Shape:
        dense ``(batch, num_dense)`` float, sparse ``(batch, num_features)`` int -> logits ``(batch,)``.
    """

    pair_index: Tensor  # the interacting pairs' flat positions in the products (a buffer)

    def __init__(
        self,
        embeddings: EmbeddingCollection,
        num_dense: int = 13,
        bottom: Sequence[int] = (512, 256, 64),
        top: Sequence[int] = (512, 256),
    ) -> None:
        super().__init__()
        dim = embeddings.embedding_dim
        self.embeddings = embeddings
        self.bottom = mlp(num_dense, [*bottom, dim])
        vectors = len(embeddings.features) + 1
        self.num_interactions = vectors * (vectors - 1) // 2
        self.top = mlp(dim + self.num_interactions, [*top, 1], final_activation=False)
        rows, columns = torch.triu_indices(vectors, vectors, offset=1)
        # pair (i, j) as a position in the flattened (F + 1) x (F + 1) products
        self.register_buffer("pair_index", rows * vectors + columns, persistent=False)

    def forward(self, dense: Tensor, sparse: Tensor, bags: Mapping[str, Bags] | None = None) -> Tensor:
        """Click logits for a batch (apply a sigmoid for probabilities); ``bags``: the multi-hot features' ids."""
        dense_vector = self.bottom(dense)
        vectors = torch.cat([dense_vector.unsqueeze(1), self.embeddings(sparse, bags)], dim=1)  # (B, F + 1, d)
        pairs = pairwise_dots(vectors, self.pair_index)  # each unordered pair once
        return self.top(torch.cat([dense_vector, pairs], dim=1)).squeeze(-1)


def pairwise_dots(vectors: Tensor, pair_index: Tensor) -> Tensor:
    """Dot products of the pairs of ``vectors`` ``(B, V, d)`` at ``pair_index`` (flat positions ``i * V + j``) of
    their ``(V, V)`` products: ``(B, pairs)``. The same values as ``bmm(x, x^T)`` indexed; its backward is one
    batched matmul, ``(G + G^T) x``, where autograd's takes two."""
    return _PairwiseDots.apply(vectors, pair_index)


class _PairwiseDots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vectors: Tensor, pair_index: Tensor) -> Tensor:
        ctx.save_for_backward(vectors, pair_index)
        products = torch.bmm(vectors, vectors.transpose(1, 2))
        return products.flatten(1).index_select(1, pair_index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        vectors, pair_index = ctx.saved_tensors
        count = vectors.shape[1]
        products_grad = grad.new_zeros(grad.shape[0], count * count).index_copy_(1, pair_index, grad)
        products_grad = products_grad.view(-1, count, count)
        # d(x x^T) = G x + G^T x
        return torch.bmm(products_grad + products_grad.transpose(1, 2), vectors), None
