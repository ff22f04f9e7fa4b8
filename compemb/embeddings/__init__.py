"""Every compressed-embedding method; importing this package registers them all."""

from compemb.embeddings.adaembed import AdaEmbed
from compemb.embeddings.base import CompressedEmbedding

# after the baselines, so listings (compemb methods, sweeps over all methods) show them first
from compemb.embeddings.cafe import CAFEEmbedding, MultiLevelCAFEEmbedding
from compemb.embeddings.cce import (
    CCEmbedding,
    ClusterReport,
    ClusterSchedule,
    HybridCCEmbedding,
    PaperAccountedCCEmbedding,
)
from compemb.embeddings.dhe import DeepHashEmbedding
from compemb.embeddings.field_hash import FieldHashEmbedding
from compemb.embeddings.full import FullEmbedding
from compemb.embeddings.hash_embedding import HashEmbeddings
from compemb.embeddings.hashing import BloomEmbedding, CompositionalEmbedding, HashingTrickEmbedding
from compemb.embeddings.lowrank import LowRankEmbedding
from compemb.embeddings.mch import ManagedCollisionEmbedding
from compemb.embeddings.mixed_dim import MixedDimEmbedding
from compemb.embeddings.offline import OfflineFrequencyEmbedding
from compemb.embeddings.qr import QREmbedding
from compemb.embeddings.robe import HashedNetsEmbedding, ROBEEmbedding
from compemb.embeddings.tt import TTEmbedding

__all__ = [
    "AdaEmbed",
    "BloomEmbedding",
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
    "HybridCCEmbedding",
    "LowRankEmbedding",
    "ManagedCollisionEmbedding",
    "MixedDimEmbedding",
    "MultiLevelCAFEEmbedding",
    "OfflineFrequencyEmbedding",
    "PaperAccountedCCEmbedding",
    "QREmbedding",
    "ROBEEmbedding",
    "TTEmbedding",
]
