"""Training and evaluation: a short linear loop over a preprocessed data set, with checkpoints and resume.

The loop (:class:`Trainer`, ``loop.py``) reads batches in order from memory-mapped arrays (``batches.py``), so a run
is fully determined by its config (:class:`TrainConfig`, ``config.py``) and a resumed run sees exactly the batches
the interrupted one would have. What a config builds (model, optimizers, refusals) is ``build.py``; the run
directory's files ``run_dir.py``; checkpoints, safetensors (model, optimizer tensors, RNG state) plus JSON (config,
step, optimizer settings, best result) written atomically and verified when read, ``checkpoints.py``. Evaluation
reports BCE, exact AUC and, for synthetic data, the gap to the Bayes-optimal BCE; every evaluation is appended to
``metrics.jsonl`` in the run directory.
"""

from compemb.train.batches import bag_rows, read_batch, read_rows, unpack_batch
from compemb.train.build import (
    bag_counts,
    build_model,
    check_trainable,
    id_counts,
    make_optimizer,
    one_optimizer,
    set_learning_rates,
)
from compemb.train.checkpoints import (
    CHECKPOINT_FIELDS,
    KILL_WHILE_WRITING,
    TRUST_UNVERIFIED,
    CheckpointError,
    checkpoint_config,
    find_checkpoint,
    load_model_state,
    no_checkpoint,
    read_checkpoint,
    read_config,
)
from compemb.train.config import (
    OPTIMIZERS,
    OVERRIDABLE,
    RESULT_NEUTRAL,
    SCHEDULE_OPTIONS,
    TABLE_OPTIMIZERS,
    EvaluationSteps,
    TrainConfig,
    settings_that_differ,
    with_defaults,
)
from compemb.train.loop import NonFiniteLossError, Trainer
from compemb.train.run_dir import (
    BEST,
    CHECKPOINTS,
    LAST,
    LOG_FILE,
    NEXT,
    PREVIOUS,
    RunExistsError,
    is_run_log,
    run_files,
)

__all__ = [
    "BEST",
    "CHECKPOINTS",
    "CHECKPOINT_FIELDS",
    "CheckpointError",
    "EvaluationSteps",
    "KILL_WHILE_WRITING",
    "LAST",
    "LOG_FILE",
    "NEXT",
    "NonFiniteLossError",
    "OPTIMIZERS",
    "OVERRIDABLE",
    "PREVIOUS",
    "RESULT_NEUTRAL",
    "RunExistsError",
    "SCHEDULE_OPTIONS",
    "TABLE_OPTIMIZERS",
    "TRUST_UNVERIFIED",
    "TrainConfig",
    "Trainer",
    "bag_counts",
    "bag_rows",
    "build_model",
    "check_trainable",
    "checkpoint_config",
    "find_checkpoint",
    "id_counts",
    "is_run_log",
    "load_model_state",
    "make_optimizer",
    "no_checkpoint",
    "one_optimizer",
    "read_batch",
    "read_checkpoint",
    "read_config",
    "read_rows",
    "run_files",
    "set_learning_rates",
    "settings_that_differ",
    "unpack_batch",
    "with_defaults",
]
