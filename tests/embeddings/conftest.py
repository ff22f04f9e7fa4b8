"""Helpers shared by the embedding tests."""

import torch

from compemb import METHODS, make_embedding

ALL_METHODS = sorted(METHODS)


def build(method: str, num_embeddings: int = 1000, embedding_dim: int = 8, compression: float = 4, **options):
    """Build any registered method; the full table gets its own size as the budget."""
    if not METHODS[method].compresses:
        compression = 1
    return make_embedding(method, num_embeddings, embedding_dim, compression=compression, **options)


def reference_bags(module, ids, offsets, per_sample_weights=None, mode="sum"):
    """Slow reference: look up each id alone, then reduce each bag in a Python loop."""
    bounds = offsets.tolist() + [len(ids)]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start == end:
            out.append(torch.zeros(module.embedding_dim, dtype=torch.float64))
            continue
        rows = [module(ids[i : i + 1])[0].double() for i in range(start, end)]
        if per_sample_weights is not None:
            rows = [row * float(per_sample_weights[i]) for row, i in zip(rows, range(start, end))]
        total = torch.stack(rows).sum(0)
        out.append(total / (end - start) if mode == "mean" else total)
    return torch.stack(out) if out else torch.zeros(0, module.embedding_dim, dtype=torch.float64)
