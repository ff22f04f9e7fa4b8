"""Which of a collection's tables are looked up together: :func:`batch_groups` sorts them, by position, into the
table batches their methods make (:mod:`compemb.table_batch`: one gather for every table of a batch) and the tables
that are looked up one at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from compemb.embeddings.base import CompressedEmbedding
from compemb.embeddings.full import FullEmbedding
from compemb.table_batch import TableBatch


def batch_groups(tables: Sequence[torch.nn.Module]) -> list[tuple[list[int], TableBatch | None]]:
    """Group tables (by position) into batches their method can look up together; ``None``: one at a time.

    Tables group when they are of one class, with one ``sparse``, and the class's ``table_batch`` accepts them.
    """
    keys: dict[tuple, list[int]] = {}
    for position, table in enumerate(tables):
        batchable = isinstance(table, CompressedEmbedding)
        keys.setdefault((type(table), table.sparse) if batchable else ("alone", position), []).append(position)

    def plain(positions: list[int]) -> bool:  # a padding id or max pooling needs each table's own forward
        return all(
            getattr(tables[p], "padding_idx", None) is None and getattr(tables[p], "mode", "sum") != "max"
            for p in positions
        )

    groups: list[tuple[list[int], TableBatch | None]] = []
    for key in list(keys):  # a method whose batch takes the full tables beside it (hash): one batch, one update
        joins, full_key = getattr(key[0], "table_batch_with_full", None), (FullEmbedding, key[1])
        if joins is None or full_key not in keys or key not in keys:
            continue
        together = sorted(keys[key] + keys[full_key])
        batch = joins([tables[p] for p in together]) if plain(together) else None
        if batch is not None:
            groups.append((together, batch))
            del keys[key], keys[full_key]
    for positions in keys.values():
        first = tables[positions[0]]
        # one class per key: all are CompressedEmbeddings if the first is, and only then are they read
        members = cast("list[CompressedEmbedding]", [tables[p] for p in positions])
        batch = (
            type(first).table_batch(members) if isinstance(first, CompressedEmbedding) and plain(positions) else None
        )
        if batch is None:
            groups.extend(([p], None) for p in positions)
        else:
            groups.append((positions, batch))
    return groups
