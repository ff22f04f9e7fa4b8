"""The command's argument parser class: every option's default in its help, and errors in one line."""

from __future__ import annotations

import argparse
import difflib
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default after its help (none for required options and flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "(default:" in help_text
        ):  # the help says its default itself
            return help_text
        return help_text + " (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`HelpFormatter`; sub-command parsers are made of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:  # name the closest option of the sub-command that was given, in one line
            command = self._command_parser(parsed)
            options = [o for a in command._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
            flag = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=")[0]
            close = difflib.get_close_matches(flag, options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.exit(
                2, f"compemb: error: unrecognized arguments: {' '.join(unknown)}{hint}; see {command.prog} --help\n"
            )
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest sub-command parser the arguments chose (the options a typo should be matched against)."""
        parser: argparse.ArgumentParser = self
        while True:
            action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            chosen = getattr(parsed, action.dest, None) if action else None
            if chosen is None:
                return parser
            parser = action.choices[chosen]  # type: ignore[union-attr]

    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, naming what was wrong: ``compemb: error: ...`` and exit 2 (no usage block)."""
        self.exit(2, f"compemb: error: {message}; see {self.prog} --help\n")
