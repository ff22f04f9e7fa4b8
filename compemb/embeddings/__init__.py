"""Every compressed-embedding method; importing this package registers them all."""

from compemb.embeddings.base import CompressedEmbedding
from compemb.embeddings.full import FullEmbedding
from compemb.embeddings.hash_embedding import HashEmbeddings
from compemb.embeddings.hashing import BloomEmbedding, CompositionalEmbedding, HashingTrickEmbedding
from compemb.embeddings.qr import QREmbedding
from compemb.embeddings.robe import HashedNetsEmbedding, ROBEEmbedding
from compemb.embeddings.lowrank import LowRankEmbedding
from compemb.embeddings.dhe import DeepHashEmbedding
from compemb.embeddings.tt import TTEmbedding
from compemb.embeddings.mixed_dim import MixedDimEmbedding

# after the baselines, so listings (compemb methods, sweeps over all methods) show them first
from compemb.embeddings.cafe import CAFEEmbedding, MultiLevelCAFEEmbedding  # noqa: E402, I001
from compemb.embeddings.field_hash import FieldHashEmbedding  # noqa: E402
from compemb.embeddings.offline import OfflineFrequencyEmbedding  # noqa: E402
from compemb.embeddings.mch import ManagedCollisionEmbedding  # noqa: E402
from compemb.embeddings.adaembed import AdaEmbed  # noqa: E402
from compemb.embeddings.cce import CCEmbedding, HybridCCEmbedding, PaperAccountedCCEmbedding  # noqa: E402
from compemb.embeddings.cce import ClusterReport, ClusterSchedule  # noqa: E402

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
    "LowRankEmbedding",
    "ManagedCollisionEmbedding",
    "MixedDimEmbedding",
    "MultiLevelCAFEEmbedding",
    "OfflineFrequencyEmbedding",
    "QREmbedding",
    "ROBEEmbedding",
    "TTEmbedding",
]
