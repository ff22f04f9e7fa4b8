"""The preprocessed format every data set is written in, and reading it back by memory map.

A data set is a directory::

    manifest.json          row counts per split, per-feature cardinalities, the producer's options and facts
    <split>/dense.npy      float32 (rows, num_dense), already transformed (log(x + 1) for Criteo)
    <split>/sparse.npy     int32 or int64 (rows, num_sparse), ids in [0, cardinality) per column
    <split>/labels.npy     uint8 (rows,), 0 or 1 (absent for an unlabeled split, e.g. Criteo Kaggle's test.txt)
    <split>/bags/<name>.values.npy   a multi-hot feature's ids, row after row (optional; the manifest's "bags")
    <split>/bags/<name>.offsets.npy  int64 (rows + 1,): row r's ids are values[offsets[r]:offsets[r + 1]]
    vocabulary.safetensors the raw values behind the ids, per feature (categorified Criteo only)

Writers fill the arrays chunk by chunk through memory maps in a temporary directory that is renamed into
place when complete, so a reader never sees a half-written data set.

The names and rules both sides share are ``format.py``; writing (:class:`DatasetWriter`, the output check)
``writer.py``; reading back (:func:`open_dataset`) ``reader.py``.
"""

from compemb.data.dataset.format import (
    ARRAYS,
    MANIFEST,
    MAX_COUNT,
    PLAIN_NAME,
    SPLIT_ENTRIES,
    VALIDATED_FILE,
    VOCABULARY_FILE,
    sparse_dtype,
)
from compemb.data.dataset.reader import DatasetError, Split, open_dataset
from compemb.data.dataset.writer import DatasetWriter, check_output

__all__ = [
    "ARRAYS",
    "MANIFEST",
    "MAX_COUNT",
    "PLAIN_NAME",
    "SPLIT_ENTRIES",
    "VALIDATED_FILE",
    "VOCABULARY_FILE",
    "DatasetError",
    "DatasetWriter",
    "Split",
    "check_output",
    "open_dataset",
    "sparse_dtype",
]
