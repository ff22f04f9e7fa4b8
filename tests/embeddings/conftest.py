"""Helpers shared by the embedding tests."""

import importlib.util

import torch

from compemb import METHODS, make_embedding

# mch is TorchRec's own module: tested wherever TorchRec is installed (make test and CI install it)
ALL_METHODS = sorted(name for name in METHODS if name != "mch" or importlib.util.find_spec("torchrec"))


def zipf_counts(num_embeddings: int | None) -> torch.Tensor:
    """Deterministic Zipf-like per-id counts (ids scattered over the range), for methods built from frequencies."""
    n = 1000 if num_embeddings is None else int(num_embeddings)
    rank = (torch.arange(n) * 7919) % n  # a permutation of the ranks when n is not a multiple of 7919
    return 100_000 // (1 + rank)


def make(method: str, num_embeddings, embedding_dim, **options):
    """make_embedding, adding per-id counts for methods that are built from them."""
    if METHODS[method].needs_frequencies and "frequencies" not in options:
        options["frequencies"] = zipf_counts(num_embeddings)
    return make_embedding(method, num_embeddings, embedding_dim, **options)


def build(method: str, num_embeddings: int = 1000, embedding_dim: int = 8, compression: float = 4, **options):
    """Build any registered method; the full table gets its own size as the budget."""
    if not METHODS[method].compresses:
        compression = 1
    return make(method, num_embeddings, embedding_dim, compression=compression, **options)


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
