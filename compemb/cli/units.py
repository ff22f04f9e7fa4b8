"""Sizes in bytes as the command prints them (``1.23 MB``) and reads them (``--max-memory 8G``)."""

from __future__ import annotations

import argparse
import re


def megabytes(num_bytes: int) -> str:
    """A size as the command prints it: ``1_234_567`` -> ``"1.23 MB"``."""
    return f"{num_bytes / 1e6:,.2f} MB"


def byte_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"100000"`` -> bytes (K, M, G, T: powers of 1,024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with K, M, G or T")
    return int(float(match[1]) * units[match[2].upper()])
