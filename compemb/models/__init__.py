"""Recommendation models that take their embeddings from an EmbeddingCollection."""

from compemb.models.dcn import DCNv2
from compemb.models.dlrm import DLRM

__all__ = ["DCNv2", "DLRM"]
