"""compemb: train recommendation models with compressed embedding tables."""

from compemb.budget import Budget, BudgetError, MemoryReport, resolve_budget
from compemb.embeddings import (
    BloomEmbedding,
    CompositionalEmbedding,
    CompressedEmbedding,
    FullEmbedding,
    HashedNetsEmbedding,
    HashEmbeddings,
    HashingTrickEmbedding,
    QREmbedding,
    ROBEEmbedding,
)
from compemb.hashing import UniversalHash
from compemb.registry import METHODS, get_method, make_embedding, register

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BloomEmbedding",
    "Budget",
    "BudgetError",
    "CompositionalEmbedding",
    "CompressedEmbedding",
    "FullEmbedding",
    "HashEmbeddings",
    "HashedNetsEmbedding",
    "HashingTrickEmbedding",
    "MemoryReport",
    "QREmbedding",
    "ROBEEmbedding",
    "UniversalHash",
    "get_method",
    "make_embedding",
    "register",
    "resolve_budget",
]
