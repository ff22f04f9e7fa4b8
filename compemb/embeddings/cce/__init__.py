"""CCE, "Clustering the Sketch" (Tsang & Ahle, NeurIPS 2023), and its variants: ``cce`` (the paper's algorithm,
honest memory), ``cce-paper`` (the paper's accounting) and ``cce-hybrid`` (pointers for a sketch's top ids).

- :mod:`.embedding`: the three registered classes;
- :mod:`.plan`: table sizes, pointer dtype and sketch from a budget;
- :mod:`.routing`: which rows of T0 and T1 an id reads, through its pointers or hashes;
- :mod:`.counting`: what a table counts between clusterings (its sketch, its seen bitmap);
- :mod:`.clustering`: the clustering step (k-means per column, the new pointers installed) and its hooks;
- :mod:`.schedule`: when to cluster (derived from the run by default), which ids to cluster, the report;
- :mod:`.kernels`: the compiled CPU lookup (route, gather T0 + T1) and its backward;
- :mod:`.batch`: CCE tables routed and read together on the device code path.
"""

from compemb.embeddings.cce.embedding import CCEmbedding, HybridCCEmbedding, PaperAccountedCCEmbedding
from compemb.embeddings.cce.schedule import ClusterReport, ClusterSchedule

__all__ = ["CCEmbedding", "ClusterReport", "ClusterSchedule", "HybridCCEmbedding", "PaperAccountedCCEmbedding"]
