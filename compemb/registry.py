"""The method registry: ``@register("name")`` on each class, ``make_embedding`` to build any of them.

A method's options are the keyword-only arguments of its ``__init__`` (a subclass that passes ``**options`` on
adds its own to its parent's): :func:`method_options` lists them with their types, and :func:`check_options`
refuses an unknown or mistyped one with a ValueError naming the option, the method and the options it has.

This module imports no method: they import it to register, so it can be imported first, in any order.
"""

from __future__ import annotations

import difflib
import inspect
import json
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Union, cast

import torch

from compemb.budget import MemoryReport, full_table_bytes, nearest_size

if TYPE_CHECKING:
    from compemb.embeddings.base import CompressedEmbedding

METHODS: dict[str, type[CompressedEmbedding]] = {}
# what every method takes from the caller rather than from its options: the table and the budget
TABLE_ARGUMENTS = ("num_embeddings", "embedding_dim", "compression", "num_params", "seed")

_Method = TypeVar("_Method", bound="type[CompressedEmbedding]")


class _MethodConstructor(Protocol):
    """How every registered method is built: the base class's arguments, the table's, and the method's options."""

    def __call__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        *,
        compression: float | None = ...,
        num_params: int | None = ...,
        seed: int = ...,
        device: torch.device | str | None = ...,
        **options: Any,
    ) -> CompressedEmbedding: ...


def register(name: str) -> Callable[[_Method], _Method]:
    """Class decorator: make a CompressedEmbedding subclass buildable as ``make_embedding(name, ...)``."""

    def add(cls: _Method) -> _Method:
        from compemb.embeddings.base import CompressedEmbedding  # loaded already: cls subclasses it

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


@dataclass(frozen=True)
class MethodOption:
    """One option of a method: its name, its type (the annotation) and its default."""

    name: str
    annotation: Any
    default: Any


def method_options(method: str | type) -> dict[str, MethodOption]:
    """The options a method (a registered name, or its class) takes: keyword-only ``__init__`` arguments, through
    the ``**options`` of subclasses.

        >>> method_options("cce")["cluster_every"].default is None  # None: a schedule derived from the run
        True
    """
    cls = get_method(method) if isinstance(method, str) else method
    found: dict[str, MethodOption] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        parameters = inspect.signature(init).parameters.values()
        for parameter in parameters:
            if parameter.kind is parameter.KEYWORD_ONLY and parameter.name not in found:
                found[parameter.name] = MethodOption(parameter.name, hints.get(parameter.name, Any), parameter.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return {name: option for name, option in found.items() if name not in TABLE_ARGUMENTS}


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is of the type ``annotation`` says (an int is a float; a bool is not an int)."""
    if annotation is Any:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts(member, value) for member in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(annotation) or annotation
    return not isinstance(origin, type) or isinstance(value, origin)


def _type_name(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("torch.", "").replace("NoneType", "None")


def check_options(method: str, options: dict[str, Any]) -> None:
    """Raise ValueError for an option ``method`` does not have (naming the closest) or a value of the wrong type.

    Example::

        >>> try:
        ...     check_options("cce", {"cluster_evry": 5})
        ... except ValueError as error:
        ...     print(str(error).split(";")[0])
        cce has no option 'cluster_evry' (did you mean 'cluster_every'?)
    """
    known = method_options(method)
    for key, value in options.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{method} has no option {key!r}{hint}; its options: {', '.join(known)}")
        if not _accepts(known[key].annotation, value):
            raise ValueError(
                f"{method}: option {key} must be {_type_name(known[key].annotation)}, "
                f"got {type(value).__name__} {_short_repr(value)}"
            )


def _short_repr(value: Any) -> str:
    """``repr(value)``, cut to a line: a list of a million counts is named by its length, not printed."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 8:
        return f"of {len(value):,} items"
    return reprlib.repr(value)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cce:accounting=paper:cluster_every=200"`` -> ``("cce", {"accounting": "paper", "cluster_every": 200})``.

    A sweep names one method several times with different options this way; values are read as JSON when
    they parse (numbers, true/false), else as strings.

        >>> parse_method_spec("cce:accounting=paper:cluster_every=200")
        ('cce', {'accounting': 'paper', 'cluster_every': 200})
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(":")):
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise ValueError(f"method option {item!r} in {spec!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    check_options(name, options)  # an unknown method or option, or a mistyped value, raises naming it
    return name, options


def make_embedding(
    method: str,
    num_embeddings: int | None,
    embedding_dim: int,
    *,
    compression: float | None = None,
    num_params: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> CompressedEmbedding:
    """Build the registered ``method`` for a ``num_embeddings x embedding_dim`` table within a budget.

    ``dtype`` (as nn.Embedding's): the floating dtype its tables store and compute in (float16, bfloat16, ...);
    the budget sizes the tables in float32, so a narrower dtype stores fewer bytes (``memory()`` counts them).

    Example::

        >>> emb = make_embedding("hash", 1_000_000, 16, compression=100, seed=0)
        >>> emb.memory().total  # bytes, within 1% of 1_000_000 * 16 * 4 / 100
        640016
        >>> make_embedding("cce", 1_000, 16, compression=4, dtype=torch.bfloat16)(torch.tensor([3])).dtype
        torch.bfloat16
    """
    cls = get_method(method)
    check_options(method, options)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    build = cast(_MethodConstructor, cls)  # the base class's __init__ takes no budget: every method's does
    module = build(num_embeddings, embedding_dim, compression=compression, num_params=num_params, seed=seed, **options)
    return module if dtype is None else module.to(dtype)


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
    note: str = ""  # why the ratio differs from the one asked (a budget the method cannot meet, paper accounting)


def summarize_methods(num_embeddings: int, embedding_dim: int, compression: float) -> list[MethodSummary]:
    """Every registered method built (on the meta device: nothing allocated) for one table and budget.

    The full table is shown at its own size (compression 1); a method whose per-id bookkeeping alone exceeds
    the budget (AdaEmbed at high compression) at its smallest size, so its ratio shows what it can reach.
    """
    rows = []
    for name, cls in METHODS.items():
        ratio = compression if cls.compresses else 1
        build = cast(_MethodConstructor, cls)  # the base class's __init__ takes no budget: every method's does
        # methods built from per-id counts are sized by the budget alone: counts on the meta device plan them
        options: dict[str, Any] = (
            {"frequencies": torch.empty(num_embeddings, device="meta")} if cls.needs_frequencies else {}
        )
        if cls.per_id_bytes * num_embeddings >= full_table_bytes(num_embeddings, embedding_dim) / ratio:
            with nearest_size():  # its per-id state alone exceeds the budget: shown at its smallest size
                module = build(num_embeddings, embedding_dim, compression=ratio, device="meta", **options)
        else:
            module = build(num_embeddings, embedding_dim, compression=ratio, device="meta", **options)
        report = module.memory()
        num_params = sum(p.numel() for p in module.parameters())
        reached = report.compression(num_embeddings, embedding_dim)
        note = ""
        if getattr(module, "accounting", "honest") == "paper":
            note = f"paper accounting: its floats meet {ratio:g}x, the rest is not counted"
        elif reached < 0.99 * ratio:
            note = f"cannot meet {ratio:g}x: built at the smallest budget it can meet"
        rows.append(
            MethodSummary(name, cls.title, cls.formula, num_params, report, reached, module.describe_sizes(), note)
        )
    return rows
