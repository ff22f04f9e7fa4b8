"""A run's settings (:class:`TrainConfig`, checked when made), which of them a resumed run may change, and when
it evaluates."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from compemb.collection import SHARING
from compemb.embeddings.base import INITS
from compemb.feature_methods import any_method, is_per_feature
from compemb.kernels import KERNELS

OPTIMIZERS = ("sgd", "adagrad", "adam", "adam_dense")  # adam: row-wise for tables (compemb.optim); adam_dense: torch's
# the tables' own optimizer may also be row-wise Adagrad (one accumulator per row: TorchRec's default for tables)
TABLE_OPTIMIZERS = (*OPTIMIZERS, "rowwise_adagrad")
# method options that set a schedule (``--cluster-every``): dropped for methods that do not take them
SCHEDULE_OPTIONS = ("cluster_every", "cluster_until")
# what a resumed run may change from its checkpoint's config when asked to (``allow_changes``, ``--override``)
OVERRIDABLE = (
    "data",
    "lr",
    "table_lr",
    "epochs",
    "eval_every",
    "evals_per_epoch",
    "eval_batch_size",
    "checkpoint_every",
    "checkpoint_minutes",
    "checkpoint_epochs",
    "device",
    "cuda_graph",
)
# settings that change no result (where files go, how often checkpoints are written, the eval batching)
RESULT_NEUTRAL = ("out", "eval_batch_size", "checkpoint_every", "checkpoint_minutes", "checkpoint_epochs")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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
        # checked in this order: where settings are wrong in several ways, the first of these names it
        self._check_sizes()
        self._check_optimizers()
        self._check_method()
        self._check_choices()
        self._check_device()
        self.bottom, self.top = tuple(self.bottom), tuple(self.top)

    def _check_sizes(self) -> None:
        """Sizes, the budget, the MLPs' widths, the checkpoints' intervals (ValueError naming the setting)."""
        positive = {
            "embedding_dim": self.embedding_dim,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "eval_batch_size": self.eval_batch_size,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.compression is not None and not (
            isinstance(self.compression, (int, float)) and math.isfinite(self.compression) and self.compression > 0
        ):
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

    def _check_optimizers(self) -> None:
        """The optimizers' names and learning rates."""
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

    def _check_method(self) -> None:
        """The method (an unknown one or option: the error names it), its options and its budget."""
        compresses = any_method(self.method, "compresses")  # an unknown method or option: the error names it
        if is_per_feature(self.method):
            if self.method_options:
                raise ValueError(
                    f"method options go in the parts of a method per feature (e.g. 'C3=cce:cluster_every"
                    f"=200;*=hash'), not in method_options {self.method_options}"
                )
            if self.sharing == "shared":
                raise ValueError("a method per feature needs sharing 'per_feature': one shared table has one method")
        if compresses and self.compression is None and self.num_params is None:
            raise ValueError(
                f"method {self.method!r} compresses the tables: give it a budget, compression (a ratio; "
                f"--compression R) or num_params (floats; --num-params P)"
            )

    def _check_choices(self) -> None:
        """The settings that take one of a few values, and the evaluation schedule."""
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
            raise ValueError(
                f"give eval_every ({self.eval_every}) or evals_per_epoch ({self.evals_per_epoch}), not both"
            )

    def _check_device(self) -> None:
        """The device (one this machine has), and what a CUDA graph needs."""
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
            raise ValueError(
                f"evals_per_epoch {self.evals_per_epoch} is more than the {self.steps_per_epoch} steps of "
                f"an epoch: give at most {self.steps_per_epoch} (or eval_every)"
            )

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
    return [
        name
        for name in dict.fromkeys([*now, *saved])
        if name not in ignore and saved.get(name) != now.get(name) and plain_saved.get(name) != plain_now.get(name)
    ]
