"""CAFE (Zhang et al., SIGMOD 2024) and CAFE-ML: a HotSketch gives important ids rows of their own.

- :mod:`.embedding`: the two registered classes, the authors' layout across fields;
- :mod:`.settings`: the default hash_rate and threshold per budget (the paper's table, compemb's rule);
- :mod:`.plan`: the fields kept full, the hot rows, sketch and hashed rows a budget buys;
- :mod:`.layout`: where each field's rows lie and which row an id reads;
- :mod:`.hot_rows`: how hot rows change hands (promotion, demotion) as the sketch scores ids;
- :mod:`.kernels`: the compiled CPU routing and the choice of ids that take free hot rows;
- :mod:`.batch`: a per-feature collection's tables looked up and updated together.
"""

from compemb.embeddings.cafe.embedding import CAFEEmbedding, MultiLevelCAFEEmbedding
from compemb.embeddings.cafe.plan import MIN_HOT_ROWS

__all__ = ["CAFEEmbedding", "MIN_HOT_ROWS", "MultiLevelCAFEEmbedding"]
