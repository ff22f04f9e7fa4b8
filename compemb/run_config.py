"""A run's settings as a file: ``compemb train --config run.toml``, ``--print-config``, and ``R/config.toml``.

The file holds :class:`compemb.train.TrainConfig`'s fields by their own names (TOML, or YAML where PyYAML is
installed); a setting left out keeps its default, a ``null`` cannot be written in TOML and means the same. A run
writes the config it trains with as ``config.toml`` in its directory, so ``compemb train --config R/config.toml
--out R2`` trains it again.

On the command line the settings come in layers, each over the one before: the parser's defaults, a ``--protocol``,
a ``--config`` file, the checkpoint of a run being resumed, and last the flags given (:func:`cli_defaults` turns a
layer into the parser's defaults).
"""

from __future__ import annotations

import json
import os
import tomllib
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from compemb.io import atomic_write_text

CONFIG_FILE = "config.toml"
# TrainConfig field -> the training commands' argument that sets it, where the names differ
CLI_NAMES = {"embedding_dim": "dim"}


def read_config_file(path: str | os.PathLike, config_type: type) -> dict[str, Any]:
    """The settings a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file holds, as ``config_type``'s (TrainConfig's)
    field -> value, validated as a config built in code is; a ValueError naming the file and what is wrong with it
    (unreadable, not a table, an unknown setting, a bad value)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path}: cannot be read ({error})") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"config file {path}: YAML needs PyYAML (pip install pyyaml), or write it as TOML"
            ) from None
        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not YAML ({str(error).splitlines()[0]})") from None
        settings = {} if settings is None else settings
    elif suffix == ".toml":
        try:
            settings = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path} is not TOML ({error})") from None
    else:
        raise ValueError(f"config file {path}: give a .toml, .yaml or .yml file")
    if not isinstance(settings, dict):
        raise ValueError(f"config file {path} holds a {type(settings).__name__}, not a table of settings")
    known = tuple(f.name for f in fields(config_type))
    unknown = [key for key in settings if key not in known]
    if unknown:
        raise ValueError(
            f"config file {path}: unknown setting{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; the settings are TrainConfig's: {', '.join(known)}"
        )
    settings = {key: value for key, value in settings.items() if value is not None}
    # each value of its setting's type here (the flags beside the file may complete it: the config as a whole is
    # checked when it is built, as one built in code is)
    hints = typing.get_type_hints(config_type)
    for key, value in settings.items():
        if not _of_type(value, hints[key]):
            raise ValueError(f"config file {path}: {key} must be {_type_name(hints[key])}, got {value!r}")
    return settings


def _of_type(value: Any, hint: Any) -> bool:
    """Whether a value read from a file fits a TrainConfig annotation (a list for a tuple, an int for a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_of_type(value, arg) for arg in args if arg is not type(None))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_of_type(item, args[0]) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(arg) for arg in args)
    if typing.get_origin(hint) is dict:
        return "a table"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(hint, str(hint))


HEADER = "# compemb train --config: every setting of the run (TrainConfig's fields)"


def config_text(config: Any) -> str:
    """``config`` (a TrainConfig) as the TOML a config file holds (unset settings, None, left out)."""
    import tomli_w

    values = json.loads(json.dumps(asdict(config)))  # tuples as lists, as TOML writes them
    return f"{HEADER}\n" + tomli_w.dumps({key: value for key, value in values.items() if value is not None})


def is_run_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a config file a run wrote (its first line is compemb's header), not a user's."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().rstrip("\n") == HEADER
    except (OSError, UnicodeDecodeError):
        return False


def write_run_config(run: str | os.PathLike, config: Any) -> Path:
    """Write ``config`` (a TrainConfig) as the run's ``config.toml`` (atomically); return its path. A ``config.toml`` there that
    compemb did not write is not replaced: a ValueError says so."""
    path = Path(run) / CONFIG_FILE
    if (path.exists() or path.is_symlink()) and not is_run_config(path):
        raise ValueError(
            f"{path} is not a config a compemb run wrote: it is left as it is; move it, or give another --out"
        )
    try:
        atomic_write_text(path, config_text(config))
    except OSError as error:  # a full disk, say: the one there (if any) is left whole
        raise OSError(f"could not write the run's settings to {path} ({error.strerror or error})") from None
    return path


def method_spec(method: str, options: dict[str, Any]) -> str:
    """``("cce", {"cluster_every": 200})`` -> ``"cce:cluster_every=200"``: ``--method``'s form of a method and its
    options (what :func:`compemb.registry.parse_method_spec` reads back)."""
    return ":".join(
        [
            method,
            *(f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in options.items()),
        ]
    )


def cli_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig settings as defaults of the training commands' arguments: widths as ``"512,256,64"``, the
    method and its options as one ``--method`` spec, ``embedding_dim`` as ``dim``."""
    if "method_options" in settings and "method" not in settings:
        raise ValueError("method_options are a method's: give the method beside them")
    defaults: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "method_options":
            continue
        if key == "method":
            value = method_spec(value, settings.get("method_options", {}))
        defaults[CLI_NAMES.get(key, key)] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    return defaults
