"""The method registry: ``@register("name")`` on each class, ``make_embedding`` to build any of them."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from compemb.budget import MemoryReport, full_table_bytes, nearest_size
from compemb.embeddings.base import CompressedEmbedding

METHODS: dict[str, type[CompressedEmbedding]] = {}

_Method = TypeVar("_Method", bound=type[CompressedEmbedding])


def register(name: str) -> Callable[[_Method], _Method]:
    """Class decorator: make a CompressedEmbedding subclass buildable as ``make_embedding(name, ...)``."""

    def add(cls: _Method) -> _Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__qualname__}")
        if not issubclass(cls, CompressedEmbedding):
            raise TypeError(f"{cls.__qualname__} must subclass CompressedEmbedding to be registered")
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return add


def get_method(name: str) -> type[CompressedEmbedding]:
    """The class registered as ``name``; an unknown name raises ValueError with the closest names."""
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown method {name!r}; {hint}available: {', '.join(METHODS)}") from None


def make_embedding(
    method: str,
    num_embeddings: int | None,
    embedding_dim: int,
    *,
    compression: float | None = None,
    num_params: int | None = None,
    seed: int = 0,
    **options: Any,
) -> CompressedEmbedding:
    """Build the registered ``method`` for a ``num_embeddings x embedding_dim`` table within a budget.

    Example::

        >>> emb = make_embedding("hash", 1_000_000, 16, compression=100, seed=0)
        >>> emb.memory().total  # bytes, within 1% of 1_000_000 * 16 * 4 / 100
        640016
    """
    cls = get_method(method)
    return cls(num_embeddings, embedding_dim, compression=compression, num_params=num_params, seed=seed, **options)


@dataclass(frozen=True)
class MethodSummary:
    """One row of ``compemb methods``: a method's formula and what it stores for one table and budget."""

    name: str
    title: str
    formula: str
    num_params: int
    memory: MemoryReport
    compression: float
    sizes: str = ""  # the sizes the budget chose, where the formula does not say them (CCE's k and pointers)


def summarize_methods(
    num_embeddings: int, embedding_dim: int, compression: float, variants: bool = False
) -> list[MethodSummary]:
    """Every registered method built (on the meta device: nothing allocated) for one table and budget.

    The full table is shown at its own size (compression 1); a method whose per-id bookkeeping alone exceeds
    the budget (AdaEmbed at high compression) at its smallest size, so its ratio shows what it can reach.
    ``variants`` adds each method's ``variants`` rows after its own (CCE's paper accounting): shown, not registered.
    """
    entries: list[tuple[str, type[CompressedEmbedding], dict]] = []
    for name, cls in METHODS.items():
        entries.append((name, cls, {}))
        if variants:
            entries += [(label, cls, dict(options)) for label, options in cls.variants]
    rows = []
    for name, cls, variant in entries:
        ratio = compression if cls.compresses else 1
        # methods built from per-id counts are sized by the budget alone: counts on the meta device plan them
        options = {"frequencies": torch.empty(num_embeddings, device="meta")} if cls.needs_frequencies else {}
        options.update(variant)
        if cls.per_id_bytes * num_embeddings >= full_table_bytes(num_embeddings, embedding_dim) / ratio:
            with nearest_size():  # its per-id state alone exceeds the budget: shown at its smallest size
                module = cls(num_embeddings, embedding_dim, compression=ratio, device="meta", **options)
        else:
            module = cls(num_embeddings, embedding_dim, compression=ratio, device="meta", **options)
        report = module.memory()
        num_params = sum(p.numel() for p in module.parameters())
        rows.append(
            MethodSummary(
                name, cls.title, cls.formula, num_params, report, report.compression(num_embeddings, embedding_dim),
                module.describe_sizes(),
            )
        )
    return rows
