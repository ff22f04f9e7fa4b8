"""Criteo click logs (Kaggle ``train.txt`` / ``test.txt``, Terabyte ``day_N``) to the preprocessed format.

A row is a label, 13 integer features and 26 categorical features written as hex, tab-separated; empty
fields are missing (``test.txt`` has no label). Dense values: missing -> 0, negative -> 0, then
log(x + 1). Categorical values: hex -> 32-bit integer, then either categorified (a first pass counts every
value; values seen fewer than ``min_count`` times share one id per feature, missing gets its own id) or
taken ``mod hash_mod`` (DLRM's max-ind-range; missing gets id ``hash_mod``). A categorified data set keeps its
vocabulary (each feature's kept values) in ``vocabulary.safetensors``, so an exported model maps raw rows as
preprocessing did.

Bad rows (wrong column count, a label other than 0/1, a non-integer dense value, a non-hex or >32-bit
categorical value) are rejected and counted by reason with their first 100 line numbers, never fixed;
``strict`` stops at the first. Rows read = rows kept + rows rejected, always. Splits follow DLRM's Kaggle
rule: seven equal chunks in order, chunks 0-5 train, chunk 6 halved into test then val. Files are streamed
in chunks (never whole in memory), plain or gzip.

Lines are parsed and files streamed in ``rows.py``; the dense transform and the vocabulary in ``transforms.py``;
files are read in pieces by worker processes in ``pieces.py``; ``preprocess.py`` runs the two passes.
"""

from compemb.data.criteo.pieces import PIECE_BYTES, Piece, PieceCount, split_pieces
from compemb.data.criteo.preprocess import kaggle_split_rows, preprocess_criteo, terabyte_split_rows
from compemb.data.criteo.rows import (
    KEPT_LINE_NUMBERS,
    MAX_LINE_BYTES,
    MISSING,
    NUM_DENSE,
    NUM_SPARSE,
    REASONS,
    Block,
    Rejections,
    RowError,
    open_binary,
    parse_row,
    read_line,
    read_rows,
)
from compemb.data.criteo.transforms import MISSING_ID, RARE_ID, VOCABULARY, Categorifier, ValueCounts, transform_dense

__all__ = [
    "KEPT_LINE_NUMBERS",
    "MAX_LINE_BYTES",
    "MISSING",
    "MISSING_ID",
    "NUM_DENSE",
    "NUM_SPARSE",
    "PIECE_BYTES",
    "RARE_ID",
    "REASONS",
    "VOCABULARY",
    "Block",
    "Categorifier",
    "Piece",
    "PieceCount",
    "Rejections",
    "RowError",
    "ValueCounts",
    "kaggle_split_rows",
    "open_binary",
    "parse_row",
    "preprocess_criteo",
    "read_line",
    "read_rows",
    "split_pieces",
    "terabyte_split_rows",
    "transform_dense",
]
