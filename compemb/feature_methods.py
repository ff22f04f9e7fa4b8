"""A method per feature: ``"C1,C2=full;C3=cce-hybrid;*=hash"`` (CLI and config files) or ``{"C3": "cce-hybrid",
"*": "hash"}`` (the library, the TorchRec adapter).

Each part names features (comma-separated, ``*``: every feature no other part names) and a method spec as
``--method`` takes it (``NAME:KEY=VALUE:...``). A plain method (``"hash"``, ``"cce:cluster_every=200"``) is every
feature's. How :class:`compemb.collection.EmbeddingCollection` spends one budget over such a mix is said there: the
features whose method stores full tables take their full size first, the others share what is left in proportion
to their full sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compemb.registry import get_method, parse_method_spec

EVERY_OTHER = "*"


def is_per_feature(spec: str | Mapping[str, str]) -> bool:
    """Whether ``spec`` gives features methods of their own (a mapping, or ``NAMES=METHOD;...``), not one method."""
    return not isinstance(spec, str) or "=" in spec.split(":", 1)[0]


def parse_feature_methods(spec: str | Mapping[str, str]) -> dict[str, str]:
    """``"C1,C2=full;*=hash"`` -> ``{"C1": "full", "C2": "full", "*": "hash"}`` (a mapping is checked and copied);
    each method spec is checked (an unknown method or option raises naming it); a feature named twice raises."""
    if isinstance(spec, str) and not is_per_feature(spec):
        parse_method_spec(spec)
        return {EVERY_OTHER: spec}
    items: list[tuple[str, str]] = []
    if isinstance(spec, str):
        for part in filter(None, (part.strip() for part in spec.split(";"))):
            names, equals, method = part.partition("=")
            if not equals or not names.strip() or not method.strip():
                raise ValueError(f"method part {part!r} of {spec!r} is not FEATURES=METHOD (e.g. 'C1,C2=full')")
            items += [(name.strip(), method.strip()) for name in names.split(",")]
    else:
        items = [(str(name), str(method)) for name, method in spec.items()]
    mapping: dict[str, str] = {}
    for name, method in items:
        if not name:
            raise ValueError(f"an empty feature name in the methods {spec!r}")
        if name in mapping:
            raise ValueError(f"feature {name!r} is given two methods in {spec!r}: {mapping[name]!r} and {method!r}")
        parse_method_spec(method)
        mapping[name] = method
    if not mapping:
        raise ValueError(f"no method in {spec!r}")
    return mapping


def format_feature_methods(mapping: Mapping[str, str]) -> str:
    """The ``NAMES=METHOD;...`` form of a mapping (features of one method together, ``*`` last)."""
    by_method: dict[str, list[str]] = {}
    for name, method in mapping.items():
        by_method.setdefault(method, []).append(name)
    grouped = [(",".join(n for n in names if n != EVERY_OTHER), method) for method, names in by_method.items()]
    parts = [f"{names}={method}" for names, method in grouped if names]
    if EVERY_OTHER in mapping:
        parts.append(f"{EVERY_OTHER}={mapping[EVERY_OTHER]}")
    return ";".join(parts)


def methods_of(spec: str | Mapping[str, str]) -> list[str]:
    """The method names a spec uses (each once, in order)."""
    return list(dict.fromkeys(parse_method_spec(method)[0] for method in parse_feature_methods(spec).values()))


def assign_methods(spec: str | Mapping[str, str], features: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each feature's method and options under ``spec``; a ValueError naming a feature the spec names that is not
    among ``features``, or the features no part gives a method (without a ``*`` part)."""
    mapping = parse_feature_methods(spec)
    unknown = [name for name in mapping if name != EVERY_OTHER and name not in features]
    if unknown:
        raise ValueError(
            f"the methods name {', '.join(map(repr, unknown))}, not a feature here (the features: "
            f"{', '.join(features)})"
        )
    missing = [name for name in features if name not in mapping and EVERY_OTHER not in mapping]
    if missing:
        raise ValueError(
            f"no method for {', '.join(map(repr, missing))}: name them, or give every other feature one with '*=METHOD'"
        )
    return {name: parse_method_spec(mapping.get(name, mapping.get(EVERY_OTHER, ""))) for name in features}


def any_method(spec: str | Mapping[str, str], attribute: str) -> bool:
    """Whether any method of the spec has the class attribute ``attribute`` set (``compresses``,
    ``needs_frequencies``)."""
    return any(getattr(get_method(name), attribute) for name in methods_of(spec))
