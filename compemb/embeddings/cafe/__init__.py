"""CAFE (Zhang et al., SIGMOD 2024) and CAFE-ML: a HotSketch gives important ids rows of their own.

- :mod:`.embedding`: the two registered classes, the authors' layout across fields;
- :mod:`.settings`: the default hash_rate and threshold per budget (the paper's table, compemb's rule);
- :mod:`.kernels`: the compiled CPU routing and the choice of ids that take free hot rows.
"""

from compemb.embeddings.cafe.embedding import MIN_HOT_ROWS, CAFEEmbedding, MultiLevelCAFEEmbedding

__all__ = ["CAFEEmbedding", "MIN_HOT_ROWS", "MultiLevelCAFEEmbedding"]
