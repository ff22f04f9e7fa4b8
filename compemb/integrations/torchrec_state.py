"""The ``state_dict`` of a :class:`~compemb.integrations.torchrec.CompressedEmbeddingBagCollection`, under
EmbeddingBagCollection's keys.

Each table module is reachable twice: as ``embedding_bags.<table>`` (EmbeddingBagCollection's path) and through
compemb's collections (``collections.dim<D>.embeddings.<table>``). Its entries are saved once, under the first, so
an EmbeddingBagCollection's checkpoint loads into ``method="full"`` and back; loading copies them to the second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from compemb.collection import EmbeddingCollection
    from compemb.integrations.torchrec import CompressedEmbeddingBagCollection


def _table_prefixes(module: CompressedEmbeddingBagCollection) -> dict[str, str]:
    """``collections.dimD.embeddings.<table>.`` -> ``embedding_bags.<table>.`` for every table module."""
    return {
        f"collections.{group}.embeddings.{name}.": f"embedding_bags.{name}."
        for group, collection in module.collections.items()
        for name in cast("EmbeddingCollection", collection).embeddings  # (a ModuleDict types it Module)
    }


def only_ebc_keys(module: CompressedEmbeddingBagCollection, state: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: each table once, under EmbeddingBagCollection's names (``embedding_bags.<table>.``); its
    second path, through ``collections``, is left out."""
    for ours in _table_prefixes(module):
        for key in [k for k in state if k.startswith(prefix + ours)]:
            del state[key]


def from_ebc_keys(module: CompressedEmbeddingBagCollection, state: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: each ``embedding_bags.<table>.`` entry (this module's own, or an EBC's) copied to
    the table's path through ``collections`` too, so both paths of the one module load (strictly) alike."""
    for ours, theirs in _table_prefixes(module).items():
        for key in [k for k in state if k.startswith(prefix + theirs)]:
            state[prefix + ours + key[len(prefix + theirs) :]] = state[key]
