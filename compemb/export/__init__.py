"""The compact model file for inference: export a trained run, load it back, score raw Criteo rows.

A model file is one safetensors file. Its tensors are what inference reads: the model's state (the compressed
tables as trained, or quantized; CAFE's hot-id map and sketch, CCE's pointers, the MLPs), without the optimizer
and without state only training uses (each method names it in ``training_only_state``: AdaEmbed's per-id
importance scores, the sketches' decayed mass, CCE's clustering progress); and, for a categorified Criteo data set,
the vocabulary (``vocabulary.C1`` ...: each feature's kept raw values, int64). Its safetensors metadata holds one
JSON header under ``"compemb"``: the format and version, the run's config, the features' cardinalities and the
dense width, how raw values map to ids, the quantization spec of each quantized table, the names left out, and a
SHA-256 over the rest of the header and every tensor's name, dtype, shape and bytes, so a truncated or altered file
(its header included) is refused rather than served.

Loading trusts nothing before it is checked, and allocates nothing the file has not earned: it reads the
safetensors index (bounded), checks the header's fields, builds the model the header describes on the ``meta``
device (shapes only) and refuses a file whose tensors are not exactly that model's (less its training-only state)
or whose model would not fit in ``max_memory``; then it hashes the file in chunks, and only then builds the model,
wraps the quantized tables as their spec says and loads the state: the predictions equal the trained model's.

The format and its checksum are ``model_file.py``; :func:`export_run` ``write.py``; :func:`load_model` and
:class:`ServedModel` ``load.py``; :func:`predict_file` ``predict.py``.
"""

from compemb.export.load import ServedModel, load_model
from compemb.export.model_file import (
    FORMAT,
    HASH_CHUNK_BYTES,
    HEADER_KEY,
    MAX_CARDINALITY,
    MAX_DENSE,
    MAX_INDEX_BYTES,
    SAFETENSORS_DTYPES,
    VERSION,
    ModelFileError,
)
from compemb.export.predict import has_label_column, predict_file
from compemb.export.write import export_run

__all__ = [
    "FORMAT",
    "HASH_CHUNK_BYTES",
    "HEADER_KEY",
    "MAX_CARDINALITY",
    "MAX_DENSE",
    "MAX_INDEX_BYTES",
    "SAFETENSORS_DTYPES",
    "VERSION",
    "ModelFileError",
    "ServedModel",
    "export_run",
    "has_label_column",
    "load_model",
    "predict_file",
]
