"""Row-wise Adam and Adagrad: embedding tables update only the rows a batch touched, so a step costs O(batch).

torch's Adam needs dense gradients, so every step touches every row of every table (its moments decay even where
the gradient is zero): O(vocabulary) work per step, which is what stops a 33.8M-row table from training at
speed. :class:`RowAdam` takes each parameter as its gradient comes:

- a **sparse** gradient (a table built with ``sparse=True``): only the rows it names are updated, their moments
  and their own step count, and the bias correction uses the row's count (``1 - beta^k`` after the row's k-th
  update). A row seen every step is updated exactly as torch's Adam updates it; a rare row is not decayed while
  unseen (the "lazy Adam" of TensorFlow's LazyAdam and torch's SparseAdam, whose bias correction uses the global
  step instead, so a row first seen late starts with ~3x the step of a new parameter);
- a **dense** gradient (the MLPs): torch's Adam update (no amsgrad, no weight decay).

:class:`RowAdagrad` is torch's Adagrad (whose sparse update is already row-wise; no lr decay, no weight decay) with
the same packing below: the Trainer's ``adagrad``.

Tables whose weights lie side by side in one buffer (a table batch, :mod:`compemb.table_batch`) are updated
together, as FBGEMM's fused optimizers update a table-batched embedding: their states are kept side by side too,
and one step coalesces, gathers and scatters the rows of all of them at once (the same arithmetic per row; a row
named twice in a batch may sum its gradients in another order, a difference of float rounding).

A row that changes owner (CAFE promotion, CCE clustering) is reset by
:func:`compemb.embeddings.adaptive.reset_optimizer_rows`: its moments and its count go to zero, so its next update
is a first update, as a new parameter's. With dense gradients (no per-row count) the reset records the step in
``row_reset_step`` and the row's bias correction uses its age since then.
"""

from compemb.optim.adagrad import RowAdagrad, RowwiseAdagrad
from compemb.optim.adam import ROW_STEP_KEY, ROW_STEPS, RowAdam
from compemb.optim.base import RowWiseOptimizer
from compemb.optim.combined import CombinedOptimizer
from compemb.optim.rows import segment_rows, unique_rows

__all__ = [
    "ROW_STEPS",
    "ROW_STEP_KEY",
    "CombinedOptimizer",
    "RowAdagrad",
    "RowAdam",
    "RowWiseOptimizer",
    "RowwiseAdagrad",
    "segment_rows",
    "unique_rows",
]
