"""DHE: "Learning to Embed Categorical Features without Embedding Tables for Recommendation", Kang et al., KDD 2021
(arXiv 2010.10784).

No table: an id's vector is computed. ``k`` seeded hashes of the id, each mapped to ``[-1, 1]`` (``"uniform"``) or
through Box-Muller to N(0, 1) (``"gaussian"``), form a dense encoding that an MLP (``k -> h -> d``, Mish) turns into
the embedding. The MLP's parameters are the budget, so any id (an open vocabulary) reads a vector.

Deviations: one hidden layer (the paper stacks several with batch norm); ``k`` and ``h`` are chosen together so the
parameters meet the budget within 1% (``k`` up to the paper's 1,024); the hash range is the paper's 10^6; the last
layer is rescaled once at init so untrained vectors have the full table's scale (DLRM's U(+-b): sd b / sqrt(3)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from compemb.budget import FLOAT_BYTES, resolve_budget
from compemb.embeddings.base import CompressedEmbedding, init_uniform_
from compemb.hashing import UniversalHash, coefficient_bytes
from compemb.registry import register

ENCODINGS = ("uniform", "gaussian")
HASH_RANGE = 1_000_000  # the paper's m
MAX_HASHES = 1024  # the paper's k
PROBE_IDS = 4096  # ids whose untrained vectors set the last layer's scale


def dhe_sizes(budget_bytes: int, embedding_dim: int) -> tuple[int, int]:
    """``(k, h)``: hashes and hidden width whose MLP (``k*h + h + h*d + d`` floats) and hashes meet the budget.

    Prefers the most hashes (up to 1,024) at which a hidden layer at least as wide as the output fits the budget
    within 1%; the hashes' coefficients (16 bytes each) count.

        >>> dhe_sizes(6_400_000, 16)
        (1024, 1533)
    """
    d = embedding_dim
    best: tuple[float, int, int] | None = None
    for k in range(min(MAX_HASHES, max(2, budget_bytes // (8 * FLOAT_BYTES))), 1, -1):
        floats = (budget_bytes - coefficient_bytes(k)) / FLOAT_BYTES - d
        h = round(floats / (k + 1 + d))
        if h < 1:
            continue
        error = abs(h * (k + 1 + d) - floats) / (budget_bytes / FLOAT_BYTES)
        if error <= 0.005 and h >= d:
            return k, h
        if best is None or error < best[0]:
            best = (error, k, h)
    return (best[1], best[2]) if best else (2, 1)


@register("dhe")
class DeepHashEmbedding(CompressedEmbedding):
    """Deep Hash Embedding: ``k`` hashes -> dense encoding -> MLP ``k -> h -> d``; no table, any id.

    Args:
        encoding: ``"uniform"`` (hashes mapped to [-1, 1]) or ``"gaussian"`` (Box-Muller of hash pairs).

    Example::

        >>> emb = DeepHashEmbedding(None, 16, num_params=100_000)
        >>> emb.num_hashes, emb.hidden, emb(torch.tensor([-7, 2**50])).shape
        (1024, 92, torch.Size([2, 16]))
    """

    open_vocabulary = True
    stores_rows = False  # every parameter serves every id: no untouched rows
    title = "DHE: hashes -> MLP, no table"
    formula = "k * h + h + h * d + d"

    sparse_gradients = False  # an MLP / tensor-train cores: every gradient is dense

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = None,
        num_params: int | None = None,
        encoding: str = "uniform",
        seed: int = 0,
        mode: str = "sum",
        sparse: bool = False,
        name: str | None = None,
        init: str = "dlrm",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            mode=mode,
            sparse=sparse,
            name=name,
            init=init,
            include_last_offset=include_last_offset,
            padding_idx=padding_idx,
        )
        if encoding not in ENCODINGS:
            raise ValueError(f"{self._who()}: encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.encoding = encoding
        budget = resolve_budget(num_embeddings, embedding_dim, compression=compression, num_params=num_params)
        self.num_hashes, self.hidden = dhe_sizes(budget.num_bytes, self.embedding_dim)
        self.hash = UniversalHash(HASH_RANGE, num_functions=self.num_hashes, seed=seed, device=device)
        self.first = torch.nn.Linear(self.num_hashes, self.hidden, device=device)
        self.last = torch.nn.Linear(self.hidden, self.embedding_dim, device=device)
        d = self.embedding_dim
        # the smallest network: 2 hashes, 1 hidden unit (k*h + h + h*d + d floats) and the hashes' coefficients
        smallest = math.ceil(coefficient_bytes(2) / FLOAT_BYTES) + (2 + 1 + d) + d
        self._finish(budget, seed, smallest)

    def encode(self, ids: Tensor) -> Tensor:
        """The dense encoding ``(N, k)`` of ``ids``: uniform in [-1, 1], or standard Gaussian."""
        # in float32 whatever the layers' dtype: hash values up to 10^6 overflow float16 (its largest is 65,504)
        unit = (self.hash(ids).float() + 0.5) / HASH_RANGE  # in (0, 1)
        dtype = self.first.weight.dtype
        if self.encoding == "uniform":
            return (unit * 2 - 1).to(dtype)
        pairs = unit.view(*unit.shape[:-1], -1, 2) if self.num_hashes % 2 == 0 else None
        if pairs is None:  # an odd k: the last hash pairs with the first
            unit = torch.cat([unit, unit[..., :1]], -1)
            pairs = unit.view(*unit.shape[:-1], -1, 2)
        radius = torch.sqrt(-2 * torch.log(pairs[..., 0]))
        angle = 2 * math.pi * pairs[..., 1]
        return (
            torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)
            .flatten(-2)[..., : self.num_hashes]
            .to(dtype)
        )

    def lookup(self, ids: Tensor) -> Tensor:
        return self.last(F.mish(self.first(self.encode(ids))))

    def reset_tables(self) -> None:
        generator = self._generator()
        for layer in (self.first, self.last):
            bound = 1 / math.sqrt(layer.in_features)  # torch's own Linear init, drawn from the module's seed
            init_uniform_(layer.weight, bound, generator)
            init_uniform_(layer.bias, bound, generator)
        if self.last.weight.is_meta:
            return
        with torch.no_grad():  # untrained vectors at the full table's scale: sd b / sqrt(3)
            self.last.bias.zero_()
            probe = torch.randint(0, 2**62, (PROBE_IDS,), generator=self._generator(1)).to(self.last.weight.device)
            spread = float(self.lookup(probe).std())
            if spread > 0:
                self.last.weight.mul_(self.init_bound / math.sqrt(3) / spread)

    def describe_sizes(self) -> str:
        """k hashes and the hidden width the budget chose, in a line (for ``compemb methods``)."""
        return f"k={self.num_hashes} hashes ({self.encoding}) -> {self.hidden} hidden -> {self.embedding_dim}"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hashes={self.num_hashes}, hidden={self.hidden}, encoding={self.encoding!r}"
