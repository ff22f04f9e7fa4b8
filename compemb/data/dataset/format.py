"""The preprocessed format's names and rules that its writer and its reader share (the layout: ``compemb.data.dataset``)."""

from __future__ import annotations

import re

import numpy as np

MANIFEST = "manifest.json"
MAX_COUNT = 1 << 62  # rows and ids are int64
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ARRAYS = ("dense", "sparse", "labels")
VOCABULARY_FILE = "vocabulary.safetensors"  # a categorified Criteo set's kept values (compemb.data.criteo writes it)
SPLIT_ENTRIES = {f"{name}.npy" for name in ARRAYS} | {"bags"}


VALIDATED_FILE = "validated.json"  # compemb.data.validate's record of a clean pass over the arrays


def sparse_dtype(cardinalities: list[int]) -> np.dtype:
    """int32 when every id fits, else int64."""
    return np.dtype(np.int32) if max(cardinalities) <= np.iinfo(np.int32).max else np.dtype(np.int64)
