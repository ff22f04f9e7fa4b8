"""Data: the preprocessed on-disk format, and the data sets that produce it."""
