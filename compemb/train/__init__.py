"""Training and evaluation: a short linear loop over a preprocessed data set, with checkpoints and resume.

The package's files name its jobs. ``config.py``: :class:`TrainConfig`, its validation, the settings a resume may
change. ``build.py``: what a config builds (data opened and checked, model, optimizers, learning rates, refusals).
``batches.py``: the batch of each step (:class:`TrainBatches`: file order or a seeded permutation, sharded under
torchrun), read from memory-mapped arrays, so a run is fully determined by its config and a resumed run sees exactly
the batches the interrupted one would have. ``step.py``: one training step on the device (and its CUDA graph).
``evaluation.py``: BCE, exact AUC and, for synthetic data, the gap to the Bayes-optimal BCE. ``run_dir.py``: the run
directory (its files, claiming and locking it); ``run_log.py``: what a run writes as it trains (``train.log``,
``metrics.jsonl``, TensorBoard); ``checkpoints.py``: safetensors (model, optimizer tensors, RNG state) plus JSON
(config, step, optimizer settings, best result), written atomically and verified when read. ``loop.py``: the
:class:`Trainer` that ties them together (fit, evaluate, save, load).
"""

from compemb.train.batches import TrainBatches, bag_rows, read_batch, read_rows, unpack_batch
from compemb.train.build import (
    bag_counts,
    build_model,
    check_trainable,
    id_counts,
    make_optimizer,
    one_optimizer,
    set_learning_rates,
    train_frequencies,
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
    "TrainBatches",
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
    "train_frequencies",
    "unpack_batch",
    "with_defaults",
]
