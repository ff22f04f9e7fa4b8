"""Progress output that suits where it goes: a tqdm bar on a terminal, plain lines (or nothing) in a log file.

tqdm redraws a bar with carriage returns; written to a file or a pipe that becomes one long line of ``\\r``-joined
chunks. So a bar is drawn only when stderr is a terminal (tqdm's ``disable=None``), never with ``TQDM_DISABLE`` set
(tqdm's own switch, honoured here too since compemb passes ``disable`` itself) or when asked to be quiet; long
jobs then say where they are in a plain line now and then (:func:`plain_lines`).
"""

from __future__ import annotations

import os
import sys


def bar_disabled(enabled: bool = True) -> bool | None:
    """tqdm's ``disable``: True when the bar is not wanted (``enabled`` False, or ``TQDM_DISABLE`` set to a true
    value), else None: a bar on a terminal only."""
    if not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return None


def plain_lines(enabled: bool = True) -> bool:
    """Whether a job should print plain progress lines instead: wanted, and no bar (stderr is not a terminal, or
    ``TQDM_DISABLE`` is set)."""
    return enabled and (bar_disabled(True) is True or not sys.stderr.isatty())
