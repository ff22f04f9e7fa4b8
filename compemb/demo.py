"""A tiny end-to-end check of every method: learn planted per-id click rates from random data.

This is ``make run``'s job until the training harness lands. Each id has a planted logit; labels are
Bernoulli(sigmoid(logit)), so the best possible BCE (the labels' own entropy) is known. Every method gets the
same budget, data and optimizer; the table shows how close each gets to that limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compemb.registry import METHODS, make_embedding


@dataclass(frozen=True)
class DemoResult:
    """One method's result: BCE before and after training, and the best BCE possible on the same data."""

    method: str
    compression: float
    initial_bce: float
    final_bce: float
    bayes_bce: float


def planted_clicks(num_ids: int, num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zipf-distributed ids, their planted click probabilities, and Bernoulli labels."""
    generator = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, num_ids + 1, dtype=torch.float64) ** 1.05
    ids = torch.multinomial(popularity, num_samples, replacement=True, generator=generator)
    logits = torch.randn(num_ids, generator=generator, dtype=torch.float64) * 1.5 - 1.0
    probability = torch.sigmoid(logits[ids])
    labels = torch.bernoulli(probability, generator=generator)
    return ids, probability, labels


def run_demo(
    methods: list[str] | None = None,
    num_ids: int = 20_000,
    embedding_dim: int = 16,
    compression: float = 10,
    steps: int = 400,
    batch_size: int = 1024,
    seed: int = 0,
) -> list[DemoResult]:
    """Train embedding -> linear -> logit with every method on the same planted data; return the BCEs."""
    ids, probability, labels = planted_clicks(num_ids, steps * batch_size + 50_000, seed)
    train_ids, train_labels = ids[:-50_000], labels[:-50_000].float()
    test_ids, test_labels, test_probability = ids[-50_000:], labels[-50_000:].float(), probability[-50_000:]
    bayes = float(F.binary_cross_entropy(test_probability.float(), test_labels))
    results = []
    for name in methods or list(METHODS):
        torch.manual_seed(seed)
        ratio = compression if METHODS[name].compresses else 1
        embedding = make_embedding(name, num_ids, embedding_dim, compression=ratio, seed=seed)
        model = torch.nn.Sequential(embedding, torch.nn.Linear(embedding_dim, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

        def test_bce() -> float:
            with torch.no_grad():
                return float(F.binary_cross_entropy_with_logits(model(test_ids).squeeze(-1), test_labels))

        initial = test_bce()
        for step in range(steps):
            batch = slice(step * batch_size, (step + 1) * batch_size)
            loss = F.binary_cross_entropy_with_logits(model(train_ids[batch]).squeeze(-1), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        results.append(DemoResult(name, ratio, initial, test_bce(), bayes))
    return results
