"""compemb: train recommendation models with compressed embedding tables."""

from compemb.budget import Budget, BudgetError, MemoryReport, resolve_budget
from compemb.compress import compress
from compemb.embeddings import (
    AdaEmbed,
    BloomEmbedding,
    CAFEEmbedding,
    CCEmbedding,
    ClusterReport,
    ClusterSchedule,
    CompositionalEmbedding,
    CompressedEmbedding,
    DeepHashEmbedding,
    FieldHashEmbedding,
    FullEmbedding,
    HashedNetsEmbedding,
    HashEmbeddings,
    HashingTrickEmbedding,
    LowRankEmbedding,
    MixedDimEmbedding,
    MultiLevelCAFEEmbedding,
    OfflineFrequencyEmbedding,
    QREmbedding,
    ROBEEmbedding,
    TTEmbedding,
)
from compemb.export import load_model
from compemb.hashing import UniversalHash
from compemb.quantize import QuantizedEmbedding, quantize
from compemb.registry import METHODS, get_method, make_embedding, register

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdaEmbed",
    "BloomEmbedding",
    "Budget",
    "BudgetError",
    "CAFEEmbedding",
    "CCEmbedding",
    "ClusterReport",
    "ClusterSchedule",
    "CompositionalEmbedding",
    "CompressedEmbedding",
    "DeepHashEmbedding",
    "FieldHashEmbedding",
    "FullEmbedding",
    "HashEmbeddings",
    "HashedNetsEmbedding",
    "HashingTrickEmbedding",
    "LowRankEmbedding",
    "MemoryReport",
    "MixedDimEmbedding",
    "MultiLevelCAFEEmbedding",
    "OfflineFrequencyEmbedding",
    "QREmbedding",
    "QuantizedEmbedding",
    "ROBEEmbedding",
    "TTEmbedding",
    "UniversalHash",
    "compress",
    "get_method",
    "load_model",
    "make_embedding",
    "quantize",
    "register",
    "resolve_budget",
]
