"""The model file's format: its header's name and version, the bounds a reader holds it to, its safetensors index,
the SHA-256 that signs it, and which of a model's state it leaves out (what only training uses)."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as save_tensors
from torch import Tensor

from compemb.embeddings.base import CompressedEmbedding

FORMAT, VERSION = "compemb-model", 2  # version 2: the checksum covers the header too
HEADER_KEY = "compemb"
MAX_CARDINALITY = 1 << 62  # ids are int64
MAX_DENSE = 1 << 20
MAX_INDEX_BYTES = 100_000_000  # safetensors' own bound on its JSON index
HASH_CHUNK_BYTES = 1 << 22
# safetensors' dtype names, to compare a file's index with the model its header describes
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ModelFileError(ValueError):
    """A model file that cannot be served: not one, damaged, altered, or of another version; the message says which."""


def read_index(file: BinaryIO, size: int, where: object) -> tuple[dict[str, Any], int]:
    """A safetensors file's index (each tensor's ``dtype``, ``shape``, ``data_offsets``; ``__metadata__``) and
    where its data starts: the format is 8 bytes of little-endian length, then that many bytes of JSON."""
    file.seek(0)
    head = file.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 <= length <= min(MAX_INDEX_BYTES, size - 8):
        raise ModelFileError(f"{where} is damaged or not a compemb model file (no safetensors index fits its size)")
    try:
        index = json.loads(file.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{where} is damaged or not a compemb model file (its index is not JSON)") from None
    return index, 8 + length


def checksum(file: BinaryIO, index: dict[str, Any], data_start: int, header: dict[str, Any]) -> str:
    """SHA-256 over the header (less its ``sha256``, as sorted JSON), then every tensor's name, dtype, shape and
    bytes in name order, read from ``file`` in chunks (a file of any size hashes in bounded memory)."""
    digest = hashlib.sha256()
    described = {key: value for key, value in header.items() if key != "sha256"}
    digest.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(key for key in index if key != "__metadata__"):
        entry = index[name]
        begin, end = entry["data_offsets"]
        digest.update(f"\n{name}|{entry['dtype']}|{list(entry['shape'])}|".encode())
        file.seek(data_start + begin)
        left = end - begin
        while left > 0:
            chunk = file.read(min(HASH_CHUNK_BYTES, left))
            if not chunk:
                raise ModelFileError(f"a tensor of {name!r} runs past the end of the file: it is truncated")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def signed_payload(tensors: dict[str, Tensor], header: dict[str, Any]) -> bytes:
    """The model file's bytes: ``tensors`` and ``header`` with the SHA-256 of both (:func:`checksum`) added."""
    described = json.loads(json.dumps(header))  # as a reader will parse it back
    unsigned = save_tensors(tensors, metadata={HEADER_KEY: json.dumps(described)})
    stream = io.BytesIO(unsigned)
    index, data_start = read_index(stream, len(unsigned), "the model being written")
    described["sha256"] = checksum(stream, index, data_start, described)
    del unsigned, stream
    return save_tensors(tensors, metadata={HEADER_KEY: json.dumps(described)})


def training_only_keys(model: torch.nn.Module) -> list[str]:
    """The names in ``model``'s state of what only training uses (each method's ``training_only_state``)."""
    keys, found = set(model.state_dict()), []
    for prefix, module in model.named_modules():  # a quantized table's method is its ``inner``: found here too
        if isinstance(module, CompressedEmbedding):
            found += [
                key for name in module.training_only_state if (key := f"{prefix}.{name}" if prefix else name) in keys
            ]
    return sorted(found)
