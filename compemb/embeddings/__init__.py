"""Every compressed-embedding method; importing this package registers them all."""

from compemb.embeddings.base import CompressedEmbedding
from compemb.embeddings.full import FullEmbedding
from compemb.embeddings.hash_embedding import HashEmbeddings
from compemb.embeddings.hashing import BloomEmbedding, CompositionalEmbedding, HashingTrickEmbedding
from compemb.embeddings.qr import QREmbedding
from compemb.embeddings.robe import HashedNetsEmbedding, ROBEEmbedding

__all__ = [
    "BloomEmbedding",
    "CompositionalEmbedding",
    "CompressedEmbedding",
    "FullEmbedding",
    "HashEmbeddings",
    "HashedNetsEmbedding",
    "HashingTrickEmbedding",
    "QREmbedding",
    "ROBEEmbedding",
]
