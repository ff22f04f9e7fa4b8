"""Training and evaluation: a short linear loop over a preprocessed data set, with checkpoints and resume.

The loop (``Trainer.fit``) reads batches in order from memory-mapped arrays, so a run is fully determined
by its config and a resumed run sees exactly the batches the interrupted one would have. Checkpoints are
safetensors (model, optimizer tensors, RNG state) plus JSON (config, step, optimizer settings, best
result), written atomically. Evaluation reports BCE, exact AUC and, for synthetic data, the gap to the
Bayes-optimal BCE. Every evaluation is appended to ``metrics.jsonl`` in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from compemb import cuda_graph, distributed
from compemb.checks import machine_memory_bytes
from compemb.collection import SHARING, Bags, EmbeddingCollection, Feature
from compemb.data.dataset import DatasetError, Split, open_dataset
from compemb.data.validate import validate_dataset
from compemb.embeddings.adaptive import end_step, track_row_steps
from compemb.embeddings.base import INITS, CompressedEmbedding
from compemb.io import atomic_path, atomic_write_text, sha256_of_file
from compemb.kernels import KERNELS, on_host, use_kernels
from compemb.metrics import auc, bce
from compemb.models import DCNv2, DLRM
from compemb.optim import CombinedOptimizer, RowAdagrad, RowAdam, RowwiseAdagrad
from compemb.outputs import check_output_directory, check_output_file
from compemb.progress import bar_disabled, plain_lines
from compemb.registry import get_method, method_options
from compemb.feature_methods import any_method, is_per_feature
from compemb.run_config import CONFIG_FILE, is_run_config, write_run_config
from compemb.run_lock import RunLock, RunLockedError
from compemb.run_plot import CURVES

OPTIMIZERS = ("sgd", "adagrad", "adam", "adam_dense")  # adam: row-wise for tables (compemb.optim); adam_dense: torch's
# the tables' own optimizer may also be row-wise Adagrad (one accumulator per row: TorchRec's default for tables)
TABLE_OPTIMIZERS = (*OPTIMIZERS, "rowwise_adagrad")
# method options that set a schedule (``--cluster-every``): dropped for methods that do not take them
SCHEDULE_OPTIONS = ("cluster_every", "cluster_until")
# what a resumed run may change from its checkpoint's config when asked to (``allow_changes``, ``--override``)
OVERRIDABLE = ("data", "lr", "table_lr", "epochs", "eval_every", "evals_per_epoch", "eval_batch_size", "checkpoint_every",
               "checkpoint_minutes", "checkpoint_epochs", "device", "cuda_graph")
# settings that change no result (where files go, how often checkpoints are written, the eval batching)
RESULT_NEUTRAL = ("out", "eval_batch_size", "checkpoint_every", "checkpoint_minutes", "checkpoint_epochs")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
POSTFIX_EVERY = 25  # steps between updates of the progress bar's loss and samples/s
CHECKPOINTS = "checkpoints"
LOG_FILE = "train.log"  # the run's progress and evaluation lines, as printed, with the time
# tests: a process whose checkpoint of this step is being written kills itself between its two files
KILL_WHILE_WRITING = "COMPEMB_TEST_KILL_WHILE_WRITING_STEP"
# checkpoints/<name>.{safetensors,json}: the newest, one being written, the one before, the best validation one
LAST, NEXT, PREVIOUS, BEST = "last", "next", "previous", "best"


class NonFiniteLossError(ValueError):
    """A training step's loss was NaN or infinite: training stops before anything of it is saved."""


class RunExistsError(ValueError):
    """A fresh run asked to write into a directory that holds another run's checkpoints or metrics."""


def run_files(run: str | os.PathLike) -> list[Path]:
    """The files of a run compemb wrote in ``run`` (its metrics and checkpoints, finished or half-written)."""
    directory = Path(run)
    stems = [directory / CHECKPOINTS / name for name in (LAST, NEXT, PREVIOUS, BEST)]
    # train.log and config.toml only where compemb wrote them: a user's file of that name is not the run's
    ours = [path for path, written in ((directory / LOG_FILE, is_run_log), (directory / CONFIG_FILE, is_run_config))
            if written(path)]
    candidates = [directory / "metrics.jsonl", *ours, *(Path(f"{stem}{suffix}") for stem in stems
                                                 for suffix in (".safetensors", ".json"))]
    return [path for path in candidates if path.is_file()]


def is_run_log(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run's train.log as compemb writes it (its first line a time and a train or eval line),
    not a user's file of that name."""
    try:
        with open(path, encoding="utf-8") as file:
            first = file.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (train|eval) ", first) is not None


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, damaged, or of another config); the message says why."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved in its checkpoints so the run can be rebuilt from its directory."""

    data: str
    out: str
    method: str = "full"
    compression: float | None = None
    num_params: int | None = None  # the tables' budget in floats (4-byte units) instead of a ratio
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = "dlrm"
    embedding_dim: int = 16
    bottom: tuple[int, ...] = (512, 256, 64)
    top: tuple[int, ...] = (512, 256)
    # the default recipe: of a recorded sweep on the default model, the one nearest the best on every set, confirmed
    # on fresh seeds (benchmarks/results/default_recipe.md); the DLRM reference's SGD 0.1 for all is --protocol dlrm
    optimizer: str = "adam"  # the MLPs' optimizer
    lr: float = 2e-3  # the MLPs' learning rate
    # the tables' own optimizer (TABLE_OPTIMIZERS; Adagrad: an accumulator per element, as the table; row-wise
    # Adagrad, TorchRec's default, keeps one per row and came second); None: the MLPs'
    table_optimizer: str | None = "adagrad"
    table_lr: float | None = 0.05  # the tables' learning rate; None: the MLPs' lr
    batch_size: int = 2048
    epochs: int = 1
    # evaluations: exactly evals_per_epoch per epoch, evenly, the last at the epoch's end (the CCE paper: 6; 0: only
    # at the end of the run); eval_every > 0 instead evaluates every that many steps and at the end of the run
    eval_every: int = 0
    evals_per_epoch: int = 1
    eval_split: str = "val"
    eval_batch_size: int = 16_384
    seed: int = 0
    init: str = "dlrm"  # the tables' init scale: "dlrm" (U(+-sqrt(1/n))) or "uniform_dim" (U(+-1/sqrt(d)))
    sharing: str = "per_feature"  # "per_feature" tables or one "shared" table over every feature's ids
    shuffle: bool = False  # train on a seeded permutation of the rows, a new one each epoch (else in file order)
    checkpoint_every: int = 0  # > 0: also a checkpoint every this many steps (checkpoints change no result)
    checkpoint_minutes: float = 5.0  # > 0: also a checkpoint when this much time has passed since the last one
    checkpoint_epochs: bool = True  # also a checkpoint at the end of every epoch (speed benchmarks turn it off)
    # train through torch.compile(model): the MLPs and interaction compiled, the lookups run as they are (see
    # EmbeddingCollection.forward); floats may round differently from eager, so it is part of the config
    compile: bool = False
    device: str = "cpu"  # where the model trains ("cuda", "cuda:1"): batches are copied there from pinned memory
    # "auto": compiled kernels on CPU, torch ops on an accelerator; "torch": the accelerator's code path on CPU too
    # (compemb.kernels; a sketch merges batches in its own order there, so it is part of the config)
    kernels: str = "auto"
    # replay the steady-state training step as one CUDA graph (compemb.cuda_graph): a launch per step instead of
    # hundreds; bias corrections computed on the device round differently, so it is part of the config
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        positive = {"embedding_dim": self.embedding_dim, "batch_size": self.batch_size, "epochs": self.epochs,
                    "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.compression is not None and not (isinstance(self.compression, (int, float))
                                                 and math.isfinite(self.compression) and self.compression > 0):
            raise ValueError(f"compression must be a positive number, got {self.compression!r}")
        if self.compression is not None and self.compression < 1:
            raise ValueError(f"compression must be >= 1 (full table bytes / stored bytes), got {self.compression:g}")
        if self.num_params is not None:
            if isinstance(self.num_params, bool) or not isinstance(self.num_params, int) or self.num_params < 1:
                raise ValueError(f"num_params must be a positive int, got {self.num_params!r}")
            if self.compression is not None:
                raise ValueError("give compression or num_params, not both")
        if not self.bottom:  # its last width is what the dense features become, beside the embeddings
            raise ValueError("bottom MLP widths: give at least one (e.g. --bottom 64)")
        if any(not isinstance(w, int) or w < 1 for w in (*self.bottom, *self.top)):
            raise ValueError(f"MLP widths must be positive integers, got bottom {self.bottom}, top {self.top}")
        if self.checkpoint_every < 0 or not (math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0):
            raise ValueError("checkpoint_every and checkpoint_minutes must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.table_optimizer is not None and self.table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"table_optimizer must be one of {TABLE_OPTIMIZERS}, got {self.table_optimizer!r}")
        for name in ("lr", "table_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            if value is not None and value > FLOAT32_MAX:  # the tables and their steps are float32
                raise ValueError(f"{name} {value:g} is more than a float32 holds ({FLOAT32_MAX:.3g})")
        compresses = any_method(self.method, "compresses")  # an unknown method or option: the error names it
        if is_per_feature(self.method):
            if self.method_options:
                raise ValueError(f"method options go in the parts of a method per feature (e.g. 'C3=cce:cluster_every"
                                 f"=200;*=hash'), not in method_options {self.method_options}")
            if self.sharing == "shared":
                raise ValueError("a method per feature needs sharing 'per_feature': one shared table has one method")
        if compresses and self.compression is None and self.num_params is None:
            raise ValueError(f"method {self.method!r} compresses the tables: give it a budget, compression (a ratio; "
                             f"--compression R) or num_params (floats; --num-params P)")
        if self.model not in ("dlrm", "dcn"):
            raise ValueError(f"model must be 'dlrm' or 'dcn', got {self.model!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        for name in ("eval_every", "evals_per_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.eval_every and self.evals_per_epoch > 1:
            raise ValueError(f"give eval_every ({self.eval_every}) or evals_per_epoch ({self.evals_per_epoch}), not "
                             f"both")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {self.device!r} is not a torch device ('cpu', 'cuda', 'cuda:1')") from None
        if device.type not in ("cpu", "cuda"):  # mps, xla and others are not built for
            why = " holds no data" if device.type == "meta" else ""
            raise ValueError(f"device {self.device!r}{why}: compemb trains on 'cpu' or 'cuda' ('cuda:1')")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this machine has no CUDA device")
        if self.cuda_graph:
            if device.type != "cuda":
                raise ValueError(f"cuda_graph needs a CUDA device (--device cuda); device is {self.device!r}")
            if self.compile:
                raise ValueError("give cuda_graph or compile, not both (torch.compile captures graphs of its own)")
            if "adam_dense" in (self.optimizer, self.table_optimizer):
                raise ValueError("cuda_graph: optimizer adam_dense keeps its step count on the host; use adam")
        self.bottom, self.top = tuple(self.bottom), tuple(self.top)


@dataclass(frozen=True)
class EvaluationSteps:
    """When a run of ``epochs`` x ``steps_per_epoch`` steps evaluates (1-based steps: ``step in EvaluationSteps(...)``):
    ``evals_per_epoch`` times an epoch, the last at its end (0: only at the end of the run), or every ``eval_every``
    steps and at the end when that is > 0. A ValueError where an epoch has fewer steps than evaluations asked."""

    steps_per_epoch: int
    epochs: int
    evals_per_epoch: int = 1
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.eval_every == 0 and self.evals_per_epoch > self.steps_per_epoch:
            raise ValueError(f"evals_per_epoch {self.evals_per_epoch} is more than the {self.steps_per_epoch} steps of "
                             f"an epoch: give at most {self.steps_per_epoch} (or eval_every)")

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int) or not 1 <= step <= self.total_steps:
            return False
        if step == self.total_steps:
            return True
        if self.eval_every:
            return step % self.eval_every == 0
        if not self.evals_per_epoch:
            return False
        # the i-th of N evaluations of an epoch of S steps comes after its ceil(i S / N)-th step (i = 1..N): evenly
        # spread, the last at the epoch's end, N distinct steps for any N <= S
        within, count = (step - 1) % self.steps_per_epoch + 1, self.evals_per_epoch
        i = (within - 1) * count // self.steps_per_epoch + 1  # the first i whose step is not before this one
        return within == math.ceil(i * self.steps_per_epoch / count)

    def __iter__(self):
        return (step for step in range(1, self.total_steps + 1) if step in self)


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A config as a run saved it (JSON), with any setting added since at its default: what that run used."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return {**json.loads(json.dumps(defaults)), **saved}


def _resolved(values: dict[str, Any]) -> dict[str, Any]:
    """A config's settings (as JSON values) with the tables' optimizer and lr spelled out (``None``: the MLPs')."""
    resolved = dict(values)
    if resolved.get("table_optimizer") is None:
        resolved["table_optimizer"] = resolved.get("optimizer")
    if resolved.get("table_lr") is None:
        resolved["table_lr"] = resolved.get("lr")
    return resolved


def settings_that_differ(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings (JSON values, every key of either) in which two configs train differently: a table optimizer
    or lr of ``None`` ("as the MLPs'") and the MLPs' own, spelled out, are the same training."""
    plain_saved, plain_now = _resolved(saved), _resolved(now)
    return [name for name in dict.fromkeys([*now, *saved]) if name not in ignore and saved.get(name) != now.get(name)
            and plain_saved.get(name) != plain_now.get(name)]


class Trainer:
    """Builds the model for a config and data set, then trains, evaluates and checkpoints it.

    Example::

        >>> trainer = Trainer(TrainConfig(data="data/synth", out="runs/hash100", method="hash", compression=100))  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
        {'step': 977, 'split': 'val', 'bce': 0.4012, 'auc': 0.8312, ...}
    """

    def __init__(self, config: TrainConfig, resume: bool = False, *, start_if_missing: bool = False,
                 resume_from: str = LAST, allow_changes: tuple[str, ...] = (), overwrite: bool = False,
                 quiet: bool = False, log_every: int = 100, tensorboard: str | os.PathLike | None = None,
                 trust_unverified: bool = False) -> None:
        """``resume``: continue from the run's newest complete checkpoint (``resume_from="previous"``: the one
        before); with none, CheckpointError unless ``start_if_missing``. The config must equal the checkpoint's
        but for ``allow_changes`` (a subset of :data:`OVERRIDABLE`) and the settings that change no result.

        A fresh run (not resumed) whose ``out`` already holds a run (checkpoints or ``metrics.jsonl``) is refused
        by :meth:`fit` with a RunExistsError, touching nothing, unless ``overwrite``: then the old run's files
        (only those: its checkpoints and metrics) are removed when training starts. Building a Trainer to load
        and evaluate a checkpoint writes nothing.

        Progress (rank 0): a bar on a terminal; where stderr is a file or a pipe (or ``TQDM_DISABLE`` is set) a plain
        line every ``log_every`` steps (0: none); nothing with ``quiet``. Every line also goes to the run's
        ``train.log``. ``tensorboard``: a directory for TensorBoard event files (the logged train loss and every
        evaluation's metrics); a ValueError with the install line where the tensorboard package is missing.
        ``trust_unverified``: load a checkpoint whose json records no SHA-256 (see :func:`read_checkpoint`)."""
        bad = [name for name in allow_changes if name not in OVERRIDABLE]
        if bad:
            raise ValueError(f"cannot change {bad} when resuming; the settings that may change: {', '.join(OVERRIDABLE)}")
        self.config, self.trust_unverified = config, trust_unverified
        self.out = Path(config.out)
        check_output_directory(self.out, inputs=[("--data", config.data)])  # before any work
        self.manifest, self.splits = open_dataset(config.data)
        for split in ("train", config.eval_split):
            if split not in self.splits:
                raise DatasetError(f"{config.data} has no split {split!r} to train or evaluate on (it has "
                                   f"{', '.join(self.splits)})")
        # every id, label and dense value checked before training (once per data set: the pass is remembered)
        validate_dataset(config.data, self.manifest, self.splits)
        _check_trainable(config, self.splits)
        torch.manual_seed(config.seed)
        # sparse gradients are built by torch's own kernels: opt out of re-checking them, explicitly (the default)
        torch.sparse.check_sparse_tensor_invariants.disable()
        # under torchrun (WORLD_SIZE > 1): join the process group; each rank trains on its slice of every batch
        self.device = distributed.init(config.device) if distributed.launched() else torch.device(config.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.bags = list(self.manifest.get("bags", ()))  # the multi-hot features, if the data set has any
        frequencies = None
        if any_method(config.method, "needs_frequencies"):  # offline methods: ids counted in the train split
            frequencies = {f"C{i + 1}": torch.from_numpy(c) for i, c in
                           enumerate(_counted_by_every_rank(self.splits["train"], self.manifest["cardinalities"]))}
            frequencies.update(bag_counts(self.splits["train"], self.bags))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: this torch sees no CUDA device")
        _refuse_what_memory_cannot_hold(config, self.manifest["cardinalities"], self.splits["train"].dense.shape[1])
        # nccl reduces no sparse gradients: under torchrun on CUDA the (small) tables take dense ones
        sparse = None if self.world == 1 or self.device.type == "cpu" else False
        self.model = build_model(config, self.manifest["cardinalities"], self.splits["train"].dense.shape[1],
                                 frequencies, sparse=sparse, bags=self.bags).to(self.device)
        self.optimizer = _make_optimizer(config, self.model)
        self.train_model: torch.nn.Module = self.model
        # under torchrun the MLPs' gradients are DDP's; the tables' (sparse: DDP buckets sparse gradients only from
        # nn.Embedding) are averaged after backward (distributed.average_gradients); sketches, pointers and other
        # buffers stay identical because every rank applies the same gathered updates (compemb.distributed)
        self._table_parameters = [p for m in self.model.modules() if isinstance(m, CompressedEmbedding)
                                  for p in m.parameters(recurse=False)]
        if self.world > 1:
            tables = {name for name, m in self.model.named_modules() if isinstance(m, CompressedEmbedding)}
            ignored = [f"{module}.{name}" for module in tables
                       for name, _ in [*self.model.get_submodule(module).named_parameters(recurse=False),
                                       *self.model.get_submodule(module).named_buffers(recurse=False)]]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ignored)
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None, forward_sync_buffers=False)
        # the compiled module shares the model's parameters; checkpoints save the model itself (no _orig_mod keys)
        self.train_model = torch.compile(self.train_model) if config.compile else self.train_model
        self._graph: cuda_graph.StepGraph | None = None  # --cuda-graph: the captured step (made at the first)
        self._step_counter: Tensor | None = None  # --cuda-graph: the step number on the device
        if config.cuda_graph:
            why = "it trains in one process" if self.world > 1 else cuda_graph.refusal(self.model, self.optimizer)
            if why is not None:
                raise ValueError(f"cuda_graph: no CUDA graph can replay this run's step: {why}")
            cuda_graph.prepare(self.model, self.optimizer)
        self.prefetch = self.device.type != "cpu"  # read the next batch on a thread (see fit)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.steps_per_epoch = math.ceil(len(self.splits["train"]) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.evaluation_steps = EvaluationSteps(self.steps_per_epoch, config.epochs, config.evals_per_epoch,
                                                config.eval_every)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row permutation) when shuffling
        # the loss's moving average stays on the device: reading a CUDA loss every step would wait for the step
        self._running_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        # the first step whose loss was not finite (-1: none), kept on the device on the device code path (reading
        # the loss every step would make a GPU wait); on the host the loss is checked at once, before backward
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._last_checkpoint = (0, time.monotonic())  # (step, when) of the last checkpoint written or loaded
        # --resume-or-start with nothing to resume starts afresh: what a run left before its first checkpoint goes
        self.overwrite, self._resumed = overwrite or (resume and start_if_missing), False
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be an int >= 0, got {log_every!r}")
        self.quiet, self.log_every = quiet, log_every
        self._tensorboard_dir, self._tensorboard = tensorboard, None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (checked now, opened when training)
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        if resume:
            stem = find_checkpoint(self.out, resume_from)
            if stem is None:
                if not start_if_missing:
                    raise no_checkpoint(self.out, resume_from)
                print(f"compemb: no checkpoint in {self.out}: starting fresh", file=sys.stderr)
            else:
                self._check_config(stem, allow_changes)
                self.load(stem)
                self._forget_evaluations_after(self.step)
                self._resumed = True
                self._repair_best()
                _set_learning_rates(self.optimizer, config)  # an allowed new lr wins over the checkpoint's

    def fit(self, stop_at: int | None = None, final_evaluation: bool = True) -> dict[str, Any]:
        """Train to the end (or to step ``stop_at``, as an interruption would); return the last evaluation
        (``final_evaluation=False``: where none fell in the steps trained, ``{"step": ...}`` alone, as a benchmark
        timing training steps wants).

        The run directory is locked meanwhile (:class:`compemb.run_lock.RunLock`, held by rank 0): a second
        trainer into it is refused at once with a RunLockedError."""
        lock = RunLock(self.out)
        refused = ""
        if self.rank == 0:
            try:
                lock.acquire()
            except RunLockedError as error:
                refused = str(error)
        if distributed.active():  # every rank learns whether rank 0 got the lock (else they would wait for it)
            flag = torch.tensor([1 if refused else 0], device=self.device if self.device.type == "cuda" else "cpu")
            refused = refused or (f"{self.out} is being trained by another process"
                                  if distributed.all_reduce_sum(flag).item() else "")
        if refused:
            raise RunLockedError(refused)
        if self.rank == 0:  # under the lock no write is under way: what a killed write left is stale
            _remove_stale_temporaries(self.out / CHECKPOINTS)
        try:
            if self._tensorboard_dir is not None and self.rank == 0:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self._tensorboard_dir))
            return self._fit(stop_at, final_evaluation)
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None
            lock.release()

    def _fit(self, stop_at: int | None, final_evaluation: bool = True) -> dict[str, Any]:
        config = self.config
        if not self._resumed and self.step == 0:
            self._claim_run_directory()
        if self.rank == 0:  # the settings it trains with (a resumed run's may have changed), as --config reads them
            write_run_config(self.out, config)
        stop = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        adaptive = [m for m in self.model.modules() if isinstance(m, CompressedEmbedding)]
        for module in adaptive:  # schedules given as a fraction of the run (CCE's cluster_until) need its length
            module.on_train_begin(self.total_steps, self.steps_per_epoch)
        result: dict[str, Any] = {}
        # a context: the bar is closed before an error propagates, so the error is the last line printed
        # on an accelerator one background thread reads and pins the next batch while the device trains; only it then
        # calls _train_batch, in step order, so the batches are exactly those of a loop without it. On CPU the
        # thread would compete with torch's own for the cores: measured 0.935x the minimal loop against 1.012x
        shown = self.rank == 0 and not self.quiet
        lines = plain_lines(shown) and self.log_every > 0  # a log file gets plain lines, a terminal a bar
        with tqdm(total=stop, initial=self.step, desc=f"train {config.method}", unit="step",
                  disable=True if plain_lines(shown) else bar_disabled(shown)) as bar, use_kernels(config.kernels), \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="compemb-batches") as reader:
            started, samples, pausing_s = time.perf_counter(), 0, 0.0
            upcoming = reader.submit(self._prepared_batch, self.step) if self.prefetch and self.step < stop else None
            while self.step < stop:
                # batch -> forward/backward -> step -> methods' own hooks -> log -> evaluate/checkpoint
                batch = upcoming.result() if upcoming is not None else self._prepared_batch(self.step)
                if self.prefetch and self.step + 1 < stop:
                    upcoming = reader.submit(self._prepared_batch, self.step + 1)
                global_rows = self._global_rows(self.step)
                self.train_step(batch, adaptive)
                samples += global_rows
                if self.step % POSTFIX_EVERY == 0 and not bar.disable:  # formatting it costs ~1% of a step
                    bar.set_postfix(loss=f"{self.running_loss:.4f}", refresh=False,
                                    samples_s=f"{samples / (time.perf_counter() - started - pausing_s):,.0f}")
                bar.update(1)
                if self.log_every and (self.step % self.log_every == 0 or self.step == stop):
                    self._stop_if_not_finite()  # the line reads the loss anyway
                    # every rank: the line gives the loss over all ranks, as the evaluations' train_loss does
                    loss = self._mean_over_ranks(self.running_loss)
                    rate = samples / max(time.perf_counter() - started - pausing_s, 1e-9)
                    self._say(f"train {config.method}: step {self.step:,}/{stop:,}, loss {loss:.4f}, "
                              f"{rate:,.0f} samples/s", terminal=lines)
                    if self._tensorboard is not None:
                        self._tensorboard.add_scalar("train/loss", loss, self.step)
                        self._tensorboard.add_scalar("train/samples_per_s", rate, self.step)
                if self.step in self.evaluation_steps:
                    # training throughput: the time spent evaluating and checkpointing is not training
                    training_s = time.perf_counter() - started - pausing_s
                    paused = time.perf_counter()
                    self._stop_if_not_finite()  # (on the device path: the one read of the flag)
                    result = self.evaluate(config.eval_split)
                    result["train_loss"] = self._mean_over_ranks(self.running_loss)
                    for module in adaptive:  # the methods' own counters (CCE: clusterings), the most of any table
                        for key, count in module.progress().items():
                            result[key] = max(result.get(key, 0), count)
                    result["samples_per_s"] = samples / training_s
                    self._log(result)
                    self._checkpoint(result)
                    self._say(self._evaluation_line(result), terminal=shown)
                    pausing_s += time.perf_counter() - paused
                elif self._checkpoint_due():
                    self._write_last()
        self._stop_if_not_finite()
        distributed.barrier()  # rank 0's checkpoints are written when any rank returns
        if not result and not final_evaluation:
            result = {"step": self.step}
        elif not result:  # nothing left to train (a finished run resumed): its last evaluation, as it logged it
            result = self._last_logged() or {"step": self.step, **self.evaluate(config.eval_split)}
        return result

    def _forget_evaluations_after(self, step: int) -> None:
        """On resume: drop the metrics.jsonl records after the checkpoint's ``step`` (a kill between an evaluation's
        record and its checkpoint left one; the resumed run evaluates that step again and records it once). A last
        line cut by the kill is dropped too; any other line that is not a record is refused (CheckpointError)."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        text = path.read_text()
        lines, kept = text.splitlines(), []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                if number == len(lines) and not text.endswith("\n"):  # the append the kill interrupted
                    continue
                raise CheckpointError(f"{path}:{number}: not an evaluation record (a JSON object with a step): the "
                                      f"file was edited or damaged; remove that line to resume")
            if record["step"] <= step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def _last_logged(self) -> dict[str, Any] | None:
        """The last evaluation in the run's metrics.jsonl, if it is of this step."""
        try:
            lines = (self.out / "metrics.jsonl").read_text().splitlines()
            last = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            return None
        return last if isinstance(last, dict) and last.get("step") == self.step else None

    def _stop_if_not_finite(self, loss: float | None = None) -> None:
        """Raise NonFiniteLossError if a step's loss was not finite (checked before every evaluation, log line and
        checkpoint: a diverged state is never saved)."""
        bad = int(self._first_bad_step)
        if bad < 0:
            return
        kept = find_checkpoint(self.out)
        last = f"the last good checkpoint is {kept} (step {_read_meta(kept)['step']})" if kept else \
            "no checkpoint was written before it"
        value = "" if loss is None else f" ({loss})"
        raise NonFiniteLossError(f"the training loss was not finite{value} at step {bad + 1}: training stopped, "
                                 f"nothing of it saved; {last}. Check the data (non-finite dense values?) and the "
                                 f"learning rates")

    def _save_or_say_why(self, stem: Path) -> None:
        """:meth:`save`, or a CheckpointError saying what could not be written and which checkpoint is intact."""
        self._stop_if_not_finite()
        try:
            self.save(stem)
        except (OSError, SafetensorError) as error:  # a full disk, say: what was written before is untouched
            kept = find_checkpoint(self.out)
            intact = f"the checkpoint {kept} (step {_read_meta(kept)['step']}) is intact" if kept else "none was kept"
            raise CheckpointError(f"could not write the checkpoint of step {self.step} in {stem.parent} ({error}); "
                                  f"{intact}") from None

    def _repair_best(self) -> None:
        """After a resume: where the state just loaded is the best one and ``best`` lags behind it (a run killed
        between writing last and best, before compemb wrote best first), write it as best again."""
        best = self.out / CHECKPOINTS / BEST
        if self.rank != 0 or not self.best or self.best.get("step") != self.step:
            return
        if not _complete(best) or _read_meta(best).get("step", -1) < self.step:
            self.save(best)

    def _claim_run_directory(self) -> None:
        """Before a fresh run writes anything: refuse an ``out`` that holds another run, or (``overwrite``) remove
        that run's files, and only them."""
        files = run_files(self.out)
        log = self.out / LOG_FILE
        if (log.exists() or log.is_symlink()) and not is_run_log(log):  # a user's file: never appended to or removed
            raise RunExistsError(f"{log} is not a log a compemb run wrote: it is left as it is; move it, or give "
                                 f"another --out")
        if not self.overwrite:  # the curves `compemb train` draws at the end would replace a user's PNG
            check_output_file(self.out / CURVES, "png")
        distributed.barrier()  # every rank has looked before rank 0 removes anything
        if files and not self.overwrite:
            raise RunExistsError(f"{self.out} holds a run ({', '.join(str(f.relative_to(self.out)) for f in files[:3])}"
                                 f"{', ...' if len(files) > 3 else ''}): --resume continues it, --overwrite replaces "
                                 f"it (Trainer(overwrite=True)), or give another --out")
        if files and self.rank == 0:
            for path in files:
                path.unlink(missing_ok=True)
        distributed.barrier()
        self._last_checkpoint = (0, time.monotonic())

    def train_step(self, batch: tuple[torch.Tensor, ...], adaptive: list[CompressedEmbedding]) -> None:
        """One step on a batch as :meth:`_prepared_batch` gives it: forward, backward, the optimizer's step, the
        methods' own hooks (``adaptive``: the model's tables), the running loss. Nothing in it reads the device
        back unless a method's algorithm must (``compemb bench syncs`` counts what does)."""
        if self.config.cuda_graph:
            self._graph_step(batch, adaptive)
        else:
            self._step_body(self._to_device(batch), adaptive)
        self.step += 1

    def _graph_step(self, batch: tuple[torch.Tensor, ...], adaptive: list[CompressedEmbedding]) -> None:
        """:meth:`train_step` with ``--cuda-graph``: a replay of the captured step where the step is steady (past the
        warm-up, a whole batch, every table's every-step work), else eagerly (and the graph captured again)."""
        if self._step_counter is None:
            self._step_counter = torch.full((), self.step, dtype=torch.int64, device=self.device)
        if self._graph is None:
            self._graph = cuda_graph.StepGraph(lambda inputs: self._step_body(inputs, adaptive), self.device)
        steady = len(batch[2]) == self.config.batch_size and all(module.steady_step(self.step) for module in adaptive)
        if steady and self.step >= cuda_graph.WARMUP_STEPS and self._graph.ready():
            self._graph.run(batch)
            return
        self._graph.invalidate()
        on_device = self._to_device(batch)
        cuda_graph.eager_on_side_stream(lambda: self._step_body(on_device, adaptive), self.device)
        self._graph.warm = steady  # (what a capture of the next step reads was made by this one)

    def _step_body(self, batch: tuple[torch.Tensor, ...], adaptive: list[CompressedEmbedding]) -> None:
        """The step's work on a batch on the device (all a CUDA graph captures; the host's count is the caller's)."""
        dense, sparse, labels, bags = _unpack(batch, self.bags)
        logits = self.train_model(dense, sparse, bags)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        step = self.step if self._step_counter is None else self._step_counter  # (a graph replays no host value)
        if on_host(loss):
            if not math.isfinite(float(loss.detach())):  # before backward: nothing of this step reaches the weights
                self._first_bad_step.fill_(self.step)
                self._stop_if_not_finite(float(loss.detach()))
        else:
            self._first_bad_step.copy_(torch.where((self._first_bad_step < 0) & ~torch.isfinite(loss),
                                                   step, self._first_bad_step))
        if self.world > 1:  # DDP averages over ranks: each rank's mean weighted by its share of the batch
            loss = loss * (len(labels) * self.world / self._global_rows(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self._table_parameters)  # (one process: nothing to do)
        self.optimizer.step()
        # the methods' updates: under torchrun every table's recorded importance gathered in one collective, the
        # tables that update together (per-feature CAFE on a device) at once, then each table's own hook
        batches = [batch for m in self.model.modules() if isinstance(m, EmbeddingCollection)
                   for batch in m.table_batches()]
        end_step(adaptive, self.step, self.optimizer, batches)
        if self.step > 0:
            self._running_loss.mul_(0.98).add_(loss.detach(), alpha=0.02)
        else:
            self._running_loss.copy_(loss.detach())
        if self._step_counter is not None:
            self._step_counter.add_(1)

    def _checkpoint_due(self) -> bool:
        """A checkpoint between evaluations: every ``checkpoint_every`` steps, after ``checkpoint_minutes``, and at
        the end of each epoch."""
        config, (step, when) = self.config, self._last_checkpoint
        if config.checkpoint_epochs and self.step % self.steps_per_epoch == 0:
            return True
        if config.checkpoint_every and self.step - step >= config.checkpoint_every:
            return True
        return bool(config.checkpoint_minutes) and time.monotonic() - when >= 60 * config.checkpoint_minutes

    def _check_config(self, stem: Path, allow_changes: tuple[str, ...]) -> None:
        """CheckpointError naming every setting of this run that differs from the checkpoint's (and may not)."""
        saved, now = read_config(stem), json.loads(json.dumps(asdict(self.config)))
        differ = settings_that_differ(saved, now, ignore=(*RESULT_NEUTRAL, *allow_changes))
        if differ:
            listed = "; ".join(f"{name}: checkpoint {saved.get(name)!r}, now {now.get(name)!r}" for name in differ)
            allowed = [name for name in differ if name in OVERRIDABLE]
            hint = f" (--override {allowed[0]}=VALUE allows a change of {', '.join(allowed)})" if allowed else ""
            raise CheckpointError(f"{stem}: this run's settings differ from its checkpoint's: {listed}{hint}")

    def _train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of 0-based ``step``: rows in file order, or in the epoch's seeded permutation (``shuffle``)."""
        train, size = self.splits["train"], self.config.batch_size
        epoch, index = divmod(step, self.steps_per_epoch)
        start, stop = index * size, min((index + 1) * size, len(train))
        low, high = distributed.shard(start, stop)  # under torchrun: this rank's contiguous part of the batch
        if not self.config.shuffle:
            return _rows(train, slice(low, high))
        if self._order is None or self._order[0] != epoch:  # a function of (seed, epoch) alone: resumes see the same
            self._order = (epoch, np.random.default_rng([self.config.seed, epoch]).permutation(len(train)))
        # sorted within the batch: the same rows (the loss is their mean), read in file order from the memory map
        return _rows(train, np.sort(self._order[1][start:stop])[low - start : high - start])

    def _global_rows(self, step: int) -> int:
        """How many rows the batch of 0-based ``step`` has over all ranks."""
        index = step % self.steps_per_epoch
        return min(self.config.batch_size, len(self.splits["train"]) - index * self.config.batch_size)

    def _mean_over_ranks(self, value: float) -> float:
        """``value`` averaged over the ranks (itself in one process)."""
        if self.world == 1:
            return value
        total = distributed.all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=self.device))
        return float(total) / self.world

    def test_of_best(self, split: str = "test") -> dict[str, Any]:
        """Load the best validation checkpoint and evaluate it on ``split``, as the papers report test metrics."""
        best = self.out / CHECKPOINTS / BEST
        distributed.barrier()  # rank 0 has written it
        if Path(f"{best}.json").exists():
            self.load(best)
        return self.evaluate(split)

    @property
    def running_loss(self) -> float:
        """The training loss's moving average (0.98 per step)."""
        return float(self._running_loss)

    @running_loss.setter
    def running_loss(self, value: float) -> None:
        self._running_loss.fill_(value)

    def _prepared_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """Step ``step``'s batch, in pinned memory when it goes to CUDA (run on the reader thread)."""
        batch = self._train_batch(step)
        return tuple(t.pin_memory() for t in batch) if self.device.type == "cuda" else batch

    def _to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A batch on the model's device; to CUDA from pinned memory, without waiting for the copy."""
        if self.device.type == "cpu":
            return batch
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """BCE and exact AUC of the model on ``split`` (and the gap to the Bayes BCE where it is known)."""
        if self._graph is not None:  # what an evaluation makes is not what the captured step reads
            self._graph.invalidate()
        if split not in self.splits:
            raise ValueError(f"no split {split!r} in {self.config.data}; it has {list(self.splits)}")
        data = self.splits[split]
        if data.labels is None:
            raise ValueError(f"split {split!r} of {self.config.data} has no labels to evaluate against")
        self.model.eval()
        low, high = distributed.shard(0, len(data))  # under torchrun each rank scores its part; all see every logit
        size = self.config.eval_batch_size
        logits = distributed.gather_rows(torch.cat([
            self._logits(_rows(data, slice(start, min(start + size, high))))
            for start in range(low, max(high, low + 1), size)  # one (possibly empty) batch at least: cat needs one
        ])).cpu()
        self.model.train()
        labels = torch.from_numpy(np.asarray(data.labels, dtype=np.float32))
        result = {"step": self.step, "split": split, "bce": bce(logits, labels), "auc": auc(logits, labels)}
        bayes = self.manifest.get("bayes", {}).get(split)
        if bayes:
            result["bayes_bce"] = bayes["bce"]
            result["gap_to_bayes"] = result["bce"] / bayes["bce"] - 1
        return result

    def _logits(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The model's logits for a batch of ``_rows`` (on the model's device)."""
        dense, sparse, _, bags = _unpack(self._to_device(batch), self.bags)
        return self.model(dense, sparse, bags)

    def _evaluation_line(self, result: dict[str, Any]) -> str:
        """One evaluation as a person reads it, with the best so far (the checkpoint ``best`` holds)."""
        line = (f"eval {result['split']} at step {result['step']:,}/{self.total_steps:,} (epoch "
                f"{result['step'] / self.steps_per_epoch:.2f}): BCE {result['bce']:.4f}")
        if result.get("gap_to_bayes") is not None:
            line += f" ({result['gap_to_bayes']:+.2%} from Bayes)"
        line += f", AUC {result['auc']:.4f}"
        if self.best is not None:
            line += f"; best BCE {self.best['bce']:.4f} at step {self.best['step']:,}"
        return line

    def _say(self, line: str, terminal: bool) -> None:
        """Append ``line`` to the run's log file (rank 0), and print it to stderr where ``terminal`` (above the
        progress bar, if one is drawn)."""
        if self.rank != 0:
            return
        if terminal:
            tqdm.write(line, file=sys.stderr)
            sys.stderr.flush()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG_FILE, "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _log(self, result: dict[str, Any]) -> None:
        if self.rank != 0:  # every rank has the result; rank 0 writes it
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as log:
            log.write(json.dumps(result) + "\n")
        if self._tensorboard is not None:
            split = result["split"]
            for key in ("bce", "auc", "gap_to_bayes"):
                if result.get(key) is not None:
                    self._tensorboard.add_scalar(f"{split}/{key}", result[key], result["step"])
            self._tensorboard.add_scalar("train/loss", result["train_loss"], result["step"])
            self._tensorboard.flush()

    def _checkpoint(self, result: dict[str, Any]) -> None:
        improved = self.best is None or result["bce"] < self.best["bce"]
        if improved:
            self.best = result
            if self.rank == 0:  # before last: a kill between the two never leaves best behind last
                self._save_or_say_why(self.out / CHECKPOINTS / BEST)
        self._write_last()

    def _write_last(self) -> None:
        """The newest checkpoint, written so that a crash at any point leaves a complete one to resume from: the
        new one is written whole as ``next``, then ``last`` becomes ``previous`` and ``next`` becomes ``last``."""
        directory = self.out / CHECKPOINTS
        self._last_checkpoint = (self.step, time.monotonic())
        if self.rank != 0:  # the ranks' states are identical: rank 0 writes it, every rank resumes from it
            return
        self._save_or_say_why(directory / NEXT)
        if _complete(directory / LAST):
            for suffix in (".safetensors", ".json"):
                os.replace(directory / f"{LAST}{suffix}", directory / f"{PREVIOUS}{suffix}")
        for suffix in (".safetensors", ".json"):
            os.replace(directory / f"{NEXT}{suffix}", directory / f"{LAST}{suffix}")
        self._last_checkpoint = (self.step, time.monotonic())

    def save(self, stem: Path) -> None:
        """Write ``stem.safetensors`` (tensors) and ``stem.json`` (the rest), each atomically."""
        tensors = {f"model.{name}": value.detach().cpu().contiguous() for name, value in self.model.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in optimizer_state["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"config": asdict(self.config), "step": self.step, "best": self.best, "running_loss": self.running_loss,
                "optimizer_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars}
        stem.parent.mkdir(parents=True, exist_ok=True)
        # the step in both files: a pair from two different checkpoints is refused on load; the tensors' file's
        # SHA-256 in the json: damaged bytes are refused too, instead of resuming into whatever they decode to
        # written from the tensors' own memory (no serialized copy: a full table's checkpoint costs no second
        # table), hashed in chunks; the json is published first and the tensors last, so a failed json write
        # leaves neither (a kill between the two renames gives a pair of two steps, refused on load)
        with atomic_path(f"{stem}.safetensors") as temporary:
            save_file(tensors, str(temporary), metadata={"step": str(self.step)})
            meta["sha256"] = sha256_of_file(temporary)
            if os.environ.get(KILL_WHILE_WRITING) == str(self.step):  # the crash test's hook: die mid-checkpoint
                os.kill(os.getpid(), signal.SIGKILL)
            atomic_write_text(f"{stem}.json", json.dumps(meta, indent=2) + "\n")

    def load(self, stem: Path) -> None:
        """Restore model, optimizer, step, best result and RNG state from ``stem`` (CheckpointError if damaged)."""
        tensors, meta = read_checkpoint(stem, self.trust_unverified)
        load_model_state(self.model, tensors, stem)
        try:  # verified bytes, but json a person may have edited and re-signed: its pieces must still fit
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            for index, values in meta["optimizer_scalars"].items():
                state.setdefault(int(index), {}).update(values)
            self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
            torch.set_rng_state(tensors["rng.torch"])
        except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {stem}: its optimizer state does not fit this run's optimizers "
                                  f"({type(error).__name__}: {error})") from None
        self.step, self.best = meta["step"], meta["best"]
        self._graph, self._step_counter = None, None  # (--cuda-graph: captured again from the loaded state)
        self.running_loss = meta.get("running_loss", 0.0)
        self._last_checkpoint = (self.step, time.monotonic())


def _check_trainable(config: TrainConfig, splits: dict[str, Split]) -> None:
    """DatasetError, before any training, where a run could not end: a train split without rows, or an
    evaluation split without rows, without labels or with one class (its AUC is undefined: the run would train to
    its first evaluation and fail there, its checkpoint unwritten)."""
    if len(splits["train"]) == 0:
        raise DatasetError(f"{config.data}: split 'train' has no rows to train on")
    data = splits[config.eval_split]
    if len(data) == 0:
        raise DatasetError(f"{config.data}: split {config.eval_split!r} has no rows to evaluate on")
    if data.labels is None:
        raise DatasetError(f"{config.data}: split {config.eval_split!r} has no labels to evaluate against")
    positives = int(np.count_nonzero(data.labels))
    if positives in (0, len(data)):
        only = "positives" if positives else "negatives"
        raise DatasetError(f"{config.data}: split {config.eval_split!r} holds only {only} ({len(data):,} rows): its "
                           f"AUC is undefined; evaluate on a split with both classes (eval_split in a --config file)")


def _complete(stem: Path) -> bool:
    return Path(f"{stem}.safetensors").is_file() and Path(f"{stem}.json").is_file()


def _remove_stale_temporaries(directory: Path) -> None:
    """The temporary files (``.NAME.XXXX``, see :mod:`compemb.io`) of checkpoint writes that a kill interrupted."""
    if not directory.is_dir():
        return
    names = [f"{stem}{suffix}" for stem in (LAST, NEXT, PREVIOUS, BEST) for suffix in (".safetensors", ".json")]
    for path in directory.iterdir():
        if path.is_file() and any(path.name.startswith(f".{name}.") for name in names):
            path.unlink(missing_ok=True)


# the fields a checkpoint's json holds and their JSON types: anything else is refused by name (a checkpoint of a
# newer compemb, or an edited one) before any of it is used
CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "config": (dict,), "step": (int,), "best": (dict, type(None)), "running_loss": (int, float),
    "optimizer_groups": (list,), "optimizer_scalars": (dict,), "sha256": (str,)}
TRUST_UNVERIFIED = "--trust-unverified"


def _read_meta(stem: Path) -> dict[str, Any]:
    """A checkpoint's json, checked against :data:`CHECKPOINT_FIELDS` (CheckpointError naming what is wrong)."""
    try:
        if not Path(f"{stem}.json").is_file():  # a FIFO there would block the read forever
            raise OSError("not a regular file" if Path(f"{stem}.json").exists() else "missing")
        meta = json.loads(Path(f"{stem}.json").read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"checkpoint {stem}.json is damaged ({error}){_previous_offer(stem)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {stem}.json is damaged (a JSON {type(meta).__name__}, not an object)")
    unknown = sorted(set(meta) - set(CHECKPOINT_FIELDS))
    if unknown:
        raise CheckpointError(f"checkpoint {stem}.json has fields this compemb does not know ({', '.join(unknown)}): "
                              f"written by a newer compemb, or edited")
    for name, types in CHECKPOINT_FIELDS.items():
        if name == "sha256" and name not in meta:
            continue  # decided where the tensors are read: refused unless the user trusts them
        if name not in meta or not isinstance(meta[name], types) or isinstance(meta[name], bool):
            found = "missing" if name not in meta else f"a {type(meta[name]).__name__}"
            raise CheckpointError(f"checkpoint {stem}.json is damaged: {name!r} is {found}, not "
                                  f"{' or '.join(t.__name__ for t in types)}")
    if meta["step"] < 0:
        raise CheckpointError(f"checkpoint {stem}.json is damaged: step {meta['step']} is negative")
    return meta


def checkpoint_config(stem: str | os.PathLike, meta: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig a checkpoint was saved with (settings added since at their defaults), validated as a
    command line's; CheckpointError naming an unknown or invalid setting."""
    stem = Path(stem)
    saved = (meta if meta is not None else _read_meta(stem))["config"]
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"checkpoint {stem}.json has settings this compemb does not know "
                              f"({', '.join(unknown)}): written by a newer compemb, or edited")
    try:
        return TrainConfig(**with_defaults(saved))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {stem}.json has an invalid config: {error}") from None


def load_model_state(model: torch.nn.Module, tensors: dict[str, Tensor], stem: str | os.PathLike) -> None:
    """Load a checkpoint's ``model.*`` tensors into ``model``; CheckpointError where they do not fit the model its
    config describes (an edited method, dim or size)."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) or lines[0]
        raise CheckpointError(f"checkpoint {stem}: its tensors do not fit the model its config describes "
                              f"({detail})") from None


def read_checkpoint(stem: str | os.PathLike, trust_unverified: bool = False) -> tuple[dict[str, Tensor],
                                                                                      dict[str, Any]]:
    """The tensors and json of a checkpoint, verified: the json's fields, the tensors file's SHA-256 against the
    one the json records, and the step both record; CheckpointError naming the file where any fails. A checkpoint
    whose json records no SHA-256 (edited, or older than compemb's checksums) is read only ``trust_unverified``."""
    stem = Path(stem)
    meta = _read_meta(stem)
    path = Path(f"{stem}.safetensors")
    if "sha256" not in meta and not trust_unverified:
        raise CheckpointError(f"checkpoint {stem}.json records no SHA-256 of its tensors, so they cannot be "
                              f"verified (edited, or written before compemb kept checksums); {TRUST_UNVERIFIED} "
                              f"uses them anyway")
    try:
        if not path.is_file():  # a FIFO or device there would block or stream forever
            raise ValueError("not a regular file" if path.exists() else "missing")
        if "sha256" in meta and sha256_of_file(path) != meta["sha256"]:
            raise ValueError(f"its bytes do not match the SHA-256 recorded in {stem.name}.json")
        with safe_open(str(path), framework="pt") as opened:  # tensor by tensor from the mapped file: no bytes copy
            tensors = {name: opened.get_tensor(name) for name in opened.keys()}
        step = _tensors_step(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged ({error}){_previous_offer(stem)}") from None
    if step is not None and step != meta["step"]:
        raise CheckpointError(f"checkpoint {stem}: its tensors are of step {step} and its json of step "
                              f"{meta['step']}{_previous_offer(stem)}")
    return tensors, meta


def _previous_offer(stem: Path) -> str:
    previous = stem.parent / PREVIOUS
    if stem.name != PREVIOUS and _complete(previous):
        try:
            step = json.loads(Path(f"{previous}.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return ""
        return f"; the previous checkpoint (step {step}) is intact: resume from it with --resume-from previous"
    return "; no earlier checkpoint is kept" if stem.name != PREVIOUS else ""


def _tensors_step(path: str | os.PathLike) -> int | None:
    """The step a checkpoint's safetensors file records in its metadata (its header alone is read); None for a
    checkpoint written before compemb recorded it."""
    with safe_open(str(path), framework="pt") as opened:
        step = (opened.metadata() or {}).get("step")
    return None if step is None else int(step)


def _step_of(stem: Path) -> int | None:
    """The step both files of a checkpoint record, or None if either is unreadable or they differ."""
    if not _complete(stem):  # regular files only: opening a FIFO would block
        return None
    try:
        tensors_step = _tensors_step(f"{stem}.safetensors")  # None (an older checkpoint): not comparable
        json_step = json.loads(Path(f"{stem}.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return tensors_step if tensors_step == json_step else None


def no_checkpoint(run: str | os.PathLike, which: str = LAST) -> CheckpointError:
    """The error of a resume that finds no checkpoint in ``run``."""
    return CheckpointError(f"{run}: no checkpoint to resume from (checkpoints/{which}.*); --resume-or-start starts a "
                           f"fresh run where there is none")


def read_config(stem: str | os.PathLike) -> dict[str, Any]:
    """The config a checkpoint (its stem, as :func:`find_checkpoint` gives it) was saved with, with any setting
    added since at its default; CheckpointError where its JSON is damaged."""
    return with_defaults(_read_meta(Path(stem))["config"])


def find_checkpoint(run: str | os.PathLike, which: str = LAST) -> Path | None:
    """The stem of a run's checkpoint to resume from; None when the run has none.

    ``which="last"``: the newest complete one: ``last``, or ``next`` where a crash stopped a write after it was
    complete, or ``previous`` where it stopped between the two renames; a ``last`` that is damaged is returned as
    it is (loading it names the damage and offers ``previous``). ``which="previous"``: the one before.
    """
    directory = Path(run) / CHECKPOINTS
    if which != LAST:
        return directory / which if _complete(directory / which) else None
    steps = [(step, directory / name) for name in (LAST, NEXT) if (step := _step_of(directory / name)) is not None]
    if steps:
        return max(steps)[1]
    for name in (LAST, PREVIOUS):
        if _complete(directory / name):
            return directory / name
    return None


def build_model(config: TrainConfig, cardinalities: list[int], num_dense: int,
                frequencies: dict[str, Tensor] | None = None, sparse: bool | None = None,
                bags: list[dict[str, Any]] | None = None, device: str | None = None) -> torch.nn.Module:
    """The model a config describes (DLRM or DCN over an EmbeddingCollection of ``C1..Cn``), freshly seeded.

    ``frequencies`` (per-feature id counts) are needed by methods built from them (``needs_frequencies``); an
    exported model rebuilds without them (its state then loads over whatever they chose). ``sparse``: whether the
    tables' gradients are sparse (default: for every optimizer but ``adam_dense``). ``bags``: the data set's
    multi-hot features (its manifest's ``"bags"``), after the one-hot ones. ``device="meta"`` builds the shapes
    alone (nothing allocated): what a model file's header would make is measured before it is made.
    """
    torch.manual_seed(config.seed)
    features = [Feature(f"C{i + 1}", n) for i, n in enumerate(cardinalities)]
    features += [Feature(bag["name"], int(bag["cardinality"]), bag["pooling"]) for bag in bags or ()]
    # sparse table gradients wherever the optimizer takes them (all but adam_dense), as the papers train
    table_optimizer = config.table_optimizer or config.optimizer
    options = {"sparse": table_optimizer != "adam_dense" if sparse is None else sparse, "init": config.init,
               **_method_options(config.method, config.method_options)}
    if any_method(config.method, "needs_frequencies") and frequencies is None:
        frequencies = {f.name: torch.zeros(f.num_embeddings, dtype=torch.int64) for f in features}
    embeddings = EmbeddingCollection(features, config.embedding_dim, config.method, compression=config.compression,
                                     num_params=config.num_params,
                                     seed=config.seed, frequencies=frequencies, sharing=config.sharing, device=device,
                                     **options)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if config.model == "dlrm":
            return DLRM(embeddings, num_dense, config.bottom, config.top)
        return DCNv2(embeddings, num_dense, deep=config.top)


def id_counts(split: Split, cardinalities: list[int], chunk_rows: int = 1 << 20,
              rows: tuple[int, int] | None = None) -> list[np.ndarray]:
    """How often each id occurs in each sparse column of ``split`` (or of its rows ``[low, high)``): one int64
    array per feature.

    Reads the memory-mapped ids ``chunk_rows`` rows at a time, so a split of any size needs one chunk of memory.
    """
    low, high = rows if rows is not None else (0, len(split))
    counts = [np.zeros(n, dtype=np.int64) for n in cardinalities]
    for start in range(low, high, chunk_rows):
        chunk = np.asarray(split.sparse[start : min(start + chunk_rows, high)])
        for column, n in enumerate(cardinalities):
            counts[column] += np.bincount(chunk[:, column], minlength=n)[:n]
    return counts


def bag_counts(split: Split, bags: list[dict[str, Any]]) -> dict[str, Tensor]:
    """How often each id occurs in each multi-hot feature of ``split`` (every rank counts all of it: one pass)."""
    counts = {}
    for bag in bags:
        values, n = split.bags[bag["name"]][0], int(bag["cardinality"])
        total = np.zeros(n, dtype=np.int64)
        for start in range(0, len(values), 1 << 22):
            total += np.bincount(np.asarray(values[start : start + (1 << 22)]), minlength=n)[:n]
        counts[bag["name"]] = torch.from_numpy(total)
    return counts


def _counted_by_every_rank(split: Split, cardinalities: list[int]) -> list[np.ndarray]:
    """:func:`id_counts` of the whole split; under torchrun each rank counts its part and the counts are summed."""
    counts = id_counts(split, cardinalities, rows=distributed.shard(0, len(split)))
    if distributed.world_size() == 1:
        return counts
    total = distributed.all_reduce_sum(torch.from_numpy(np.concatenate(counts)))  # one collective for all features
    return [part.numpy() for part in torch.split(total, cardinalities)]


def _method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``method``, less the schedule options (:data:`SCHEDULE_OPTIONS`) it does not take.

    A sweep gives every method the same options; ``cluster_every`` only means something to methods that cluster.
    """
    if is_per_feature(method):  # each part carries its own options
        return {}
    takes = method_options(get_method(method))
    return {key: value for key, value in options.items() if key not in SCHEDULE_OPTIONS or key in takes}


def _refuse_what_memory_cannot_hold(config: TrainConfig, cardinalities: list[int], num_dense: int) -> None:
    """ValueError, before anything is allocated, where the model's parameters alone (tables at their budget, MLPs)
    would not fit in this machine's memory: a full 1e9-row table would otherwise allocate for many seconds, then die."""
    full = sum(cardinalities) * config.embedding_dim * 4
    tables = full if config.compression is None and config.num_params is None else \
        config.num_params * 4 if config.num_params is not None else full / config.compression
    widths = [num_dense, *config.bottom]
    mlp = sum((a + 1) * b for a, b in zip(widths, widths[1:])) * 4
    interactions = len(cardinalities) + 1
    top_in = config.bottom[-1] + interactions * (interactions - 1) // 2
    tops = [top_in, *config.top, 1]
    mlp += sum((a + 1) * b for a, b in zip(tops, tops[1:])) * 4
    memory = machine_memory_bytes()
    if memory is None:  # not known here: nothing to compare with
        return
    needed = tables + mlp
    if needed > memory:
        raise ValueError(f"the model's parameters alone need {needed / 1e9:,.1f} GB (tables {tables / 1e9:,.1f} GB) "
                         f"and this machine has {memory / 1e9:,.1f} GB: compress more or use smaller widths")


def _make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The config's optimizer: one for every parameter, or (``table_optimizer``/``table_lr`` differing from
    ``optimizer``/``lr``) the MLPs' and the tables' own, combined (:class:`compemb.optim.CombinedOptimizer`)."""
    table_name = config.table_optimizer or config.optimizer
    table_lr = config.lr if config.table_lr is None else config.table_lr
    if table_name == config.optimizer and table_lr == config.lr:
        return _one_optimizer(config.optimizer, list(model.parameters()), config.lr)
    tables = {id(p) for m in model.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in tables]
    table_parameters = [p for p in model.parameters() if id(p) in tables]
    return CombinedOptimizer([_one_optimizer(config.optimizer, dense, config.lr),
                              _one_optimizer(table_name, table_parameters, table_lr)])


def _set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """Every group's lr as the config says (the tables' groups ``table_lr`` under a combined optimizer)."""
    children = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for child, lr in zip(children, (config.lr, config.lr if config.table_lr is None else config.table_lr)):
        for group in child.param_groups:
            group["lr"] = lr


def _one_optimizer(name: str, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    if name == "adagrad":
        return RowAdagrad(parameters, lr=lr)
    if name == "rowwise_adagrad":
        return RowwiseAdagrad(parameters, lr=lr)
    if name == "adam":  # tables (sparse gradients) update only the rows a batch touched
        return RowAdam(parameters, lr=lr)
    adam = torch.optim.Adam(parameters, lr=lr)  # "adam_dense": every row of every table, every step
    track_row_steps(adam)  # rows that change owner (CAFE, CCE) keep their own Adam step, across resumes too
    return adam


def _batch(split: Split, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rows(split, slice(index * batch_size, (index + 1) * batch_size))


def _rows(split: Split, rows: slice | np.ndarray) -> tuple[torch.Tensor, ...]:
    """Dense, sparse and labels of ``rows`` (a slice or sorted indices), then each multi-hot feature's values and
    offsets (``batch + 1``, from 0) for those rows."""
    dense = torch.from_numpy(np.array(split.dense[rows], dtype=np.float32))
    sparse = torch.from_numpy(np.array(split.sparse[rows], dtype=np.int64))
    labels = torch.from_numpy(np.array(split.labels[rows], dtype=np.float32))
    bags = []
    for values, offsets in split.bags.values():
        picked, picked_offsets = bag_rows(values, offsets, rows)
        bags += [torch.from_numpy(picked), torch.from_numpy(picked_offsets)]
    return dense, sparse, labels, *bags


def bag_rows(values: np.ndarray, offsets: np.ndarray, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bags of ``rows`` (a slice with step 1, or row indices) of a jagged feature: their ids (int64) and their
    offsets from 0 (``len(rows) + 1``)."""
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(len(offsets) - 1)
        bounds = np.asarray(offsets[start : max(start, stop) + 1], dtype=np.int64)
        return np.array(values[bounds[0] : bounds[-1]], dtype=np.int64), bounds - bounds[0]
    starts = np.asarray(offsets[rows], dtype=np.int64)
    lengths = np.asarray(offsets[rows + 1], dtype=np.int64) - starts
    new_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # position i of the output is values[starts[row] + (i - new_offsets[row])] for the row it falls in
    positions = np.arange(new_offsets[-1]) + np.repeat(starts - new_offsets[:-1], lengths)
    return np.array(values[positions], dtype=np.int64), new_offsets


def _unpack(batch: tuple[torch.Tensor, ...], bags: list[dict[str, Any]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Bags] | None]:
    """``_rows``' tensors as the model takes them: dense, sparse, labels and the multi-hot features' Bags."""
    dense, sparse, labels, *jagged = batch
    if not bags:
        return dense, sparse, labels, None
    return dense, sparse, labels, {bag["name"]: Bags(jagged[2 * i], jagged[2 * i + 1]) for i, bag in enumerate(bags)}
