"""Training and evaluation: a short linear loop over a preprocessed data set, with checkpoints and resume.

The loop (``Trainer.fit``) reads batches in order from memory-mapped arrays, so a run is fully determined
by its config and a resumed run sees exactly the batches the interrupted one would have. Checkpoints are
safetensors (model, optimizer tensors, RNG state) plus JSON (config, step, optimizer settings, best
result), written atomically. Evaluation reports BCE, exact AUC and, for synthetic data, the gap to the
Bayes-optimal BCE. Every evaluation is appended to ``metrics.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor
from tqdm import tqdm

from compemb.collection import SHARING, EmbeddingCollection, Feature
from compemb.data.dataset import Split, open_dataset
from compemb.embeddings.adaptive import track_row_steps
from compemb.embeddings.base import INITS, CompressedEmbedding
from compemb.io import atomic_write_bytes, atomic_write_text
from compemb.metrics import auc, bce
from compemb.models import DCNv2, DLRM
from compemb.registry import get_method, method_options

OPTIMIZERS = ("sgd", "adagrad", "adam")
# method options that set a schedule (``--cluster-every``): dropped for methods that do not take them
SCHEDULE_OPTIONS = ("cluster_every", "cluster_until")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in its checkpoints so the run can be rebuilt from its directory."""

    data: str
    out: str
    method: str = "full"
    compression: float | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = "dlrm"
    embedding_dim: int = 16
    bottom: tuple[int, ...] = (512, 256, 64)
    top: tuple[int, ...] = (512, 256)
    optimizer: str = "sgd"
    lr: float = 0.1
    batch_size: int = 2048
    epochs: int = 1
    eval_every: int = 0  # steps between evaluations; 0: only at the end (see evals_per_epoch)
    evals_per_epoch: int = 0  # > 0: evaluate this many times per epoch, evenly (the CCE paper: 6); overrides eval_every
    eval_split: str = "val"
    eval_batch_size: int = 16_384
    seed: int = 0
    init: str = "dlrm"  # the tables' init scale: "dlrm" (U(+-sqrt(1/n))) or "uniform_dim" (U(+-1/sqrt(d)))
    sharing: str = "per_feature"  # "per_feature" tables or one "shared" table over every feature's ids
    shuffle: bool = False  # train on a seeded permutation of the rows, a new one each epoch (else in file order)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.model not in ("dlrm", "dcn"):
            raise ValueError(f"model must be 'dlrm' or 'dcn', got {self.model!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.evals_per_epoch < 0 or self.eval_every < 0:
            raise ValueError("eval_every and evals_per_epoch must be >= 0")
        self.bottom, self.top = tuple(self.bottom), tuple(self.top)


class Trainer:
    """Builds the model for a config and data set, then trains, evaluates and checkpoints it.

    Example::

        >>> trainer = Trainer(TrainConfig(data="data/synth", out="runs/hash100", method="hash", compression=100))  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
        {'step': 977, 'split': 'val', 'bce': 0.4012, 'auc': 0.8312, ...}
    """

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.out = Path(config.out)
        self.manifest, self.splits = open_dataset(config.data)
        torch.manual_seed(config.seed)
        # sparse gradients are built by torch's own kernels: opt out of re-checking them, explicitly (the default)
        torch.sparse.check_sparse_tensor_invariants.disable()
        frequencies = None
        if get_method(config.method).needs_frequencies:  # offline methods: ids counted in the train split
            counts = id_counts(self.splits["train"], self.manifest["cardinalities"])
            frequencies = {f"C{i + 1}": torch.from_numpy(c) for i, c in enumerate(counts)}
        self.model = build_model(config, self.manifest["cardinalities"], self.splits["train"].dense.shape[1],
                                 frequencies)
        self.optimizer = _make_optimizer(config.optimizer, self.model, config.lr)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.steps_per_epoch = math.ceil(len(self.splits["train"]) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.eval_every = max(1, self.steps_per_epoch // config.evals_per_epoch) if config.evals_per_epoch else \
            config.eval_every
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row permutation) when shuffling
        if resume and (self.out / "checkpoints" / "last.json").exists():
            self.load(self.out / "checkpoints" / "last")

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to the end (or to step ``stop_at``, as an interruption would); return the last evaluation."""
        config, train = self.config, self.splits["train"]
        stop = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        adaptive = [m for m in self.model.modules() if isinstance(m, CompressedEmbedding)]
        for module in adaptive:  # schedules given as a fraction of the run (CCE's cluster_until) need its length
            module.on_train_begin(self.total_steps)
        result: dict[str, Any] = {}
        bar = tqdm(total=stop, initial=self.step, desc=f"train {config.method}", unit="step")
        running_loss, started, samples = 0.0, time.perf_counter(), 0
        while self.step < stop:
            # batch -> forward/backward -> step -> methods' own hooks -> log -> evaluate/checkpoint
            dense, sparse, labels = self._train_batch(self.step)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.model(dense, sparse), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for module in adaptive:
                module.on_step_end(self.step, self.optimizer)
            self.step += 1
            samples += len(labels)
            loss_value = float(loss.detach())
            running_loss = 0.98 * running_loss + 0.02 * loss_value if self.step > 1 else loss_value
            bar.set_postfix(loss=f"{running_loss:.4f}", samples_s=f"{samples / (time.perf_counter() - started):,.0f}")
            bar.update(1)
            if self.step == self.total_steps or (self.eval_every and self.step % self.eval_every == 0):
                result = self.evaluate(config.eval_split)
                result["train_loss"] = running_loss
                result["samples_per_s"] = samples / (time.perf_counter() - started)
                self._log(result)
                self._checkpoint(result)
        bar.close()
        return result

    def _train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of 0-based ``step``: rows in file order, or in the epoch's seeded permutation (``shuffle``)."""
        train, size = self.splits["train"], self.config.batch_size
        epoch, index = divmod(step, self.steps_per_epoch)
        if not self.config.shuffle:
            return _batch(train, index, size)
        if self._order is None or self._order[0] != epoch:  # a function of (seed, epoch) alone: resumes see the same
            self._order = (epoch, np.random.default_rng([self.config.seed, epoch]).permutation(len(train)))
        # sorted within the batch: the same rows (the loss is their mean), read in file order from the memory map
        return _rows(train, np.sort(self._order[1][index * size : (index + 1) * size]))

    def test_of_best(self, split: str = "test") -> dict[str, Any]:
        """Load the best validation checkpoint and evaluate it on ``split``, as the papers report test metrics."""
        best = self.out / "checkpoints" / "best"
        if Path(f"{best}.json").exists():
            self.load(best)
        return self.evaluate(split)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """BCE and exact AUC of the model on ``split`` (and the gap to the Bayes BCE where it is known)."""
        if split not in self.splits:
            raise ValueError(f"no split {split!r} in {self.config.data}; it has {list(self.splits)}")
        data = self.splits[split]
        if data.labels is None:
            raise ValueError(f"split {split!r} of {self.config.data} has no labels to evaluate against")
        self.model.eval()
        logits = torch.cat([
            self.model(*_batch(data, index, self.config.eval_batch_size)[:2])
            for index in range(math.ceil(len(data) / self.config.eval_batch_size))
        ])
        self.model.train()
        labels = torch.from_numpy(np.asarray(data.labels, dtype=np.float32))
        result = {"step": self.step, "split": split, "bce": bce(logits, labels), "auc": auc(logits, labels)}
        bayes = self.manifest.get("bayes", {}).get(split)
        if bayes:
            result["bayes_bce"] = bayes["bce"]
            result["gap_to_bayes"] = result["bce"] / bayes["bce"] - 1
        return result

    def _log(self, result: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as log:
            log.write(json.dumps(result) + "\n")

    def _checkpoint(self, result: dict[str, Any]) -> None:
        improved = self.best is None or result["bce"] < self.best["bce"]
        if improved:
            self.best = result
        self.save(self.out / "checkpoints" / "last")
        if improved:
            self.save(self.out / "checkpoints" / "best")

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
        meta = {"config": asdict(self.config), "step": self.step, "best": self.best,
                "optimizer_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars}
        stem.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(f"{stem}.safetensors", save_tensors(tensors))
        atomic_write_text(f"{stem}.json", json.dumps(meta, indent=2) + "\n")

    def load(self, stem: Path) -> None:
        """Restore model, optimizer, step, best result and RNG state from ``stem``."""
        tensors = load_tensors(Path(f"{stem}.safetensors").read_bytes())
        meta = json.loads(Path(f"{stem}.json").read_text())
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in meta["optimizer_scalars"].items():
            state.setdefault(int(index), {}).update(values)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.best = meta["step"], meta["best"]


def build_model(config: TrainConfig, cardinalities: list[int], num_dense: int,
                frequencies: dict[str, Tensor] | None = None) -> torch.nn.Module:
    """The model a config describes (DLRM or DCN over an EmbeddingCollection of ``C1..Cn``), freshly seeded.

    ``frequencies`` (per-feature id counts) are needed by methods built from them (``needs_frequencies``); an
    exported model rebuilds without them (its state then loads over whatever they chose).
    """
    torch.manual_seed(config.seed)
    features = [Feature(f"C{i + 1}", n) for i, n in enumerate(cardinalities)]
    # sparse gradients where the optimizer takes them (SGD, Adagrad), as the papers train
    options = {"sparse": config.optimizer != "adam", "init": config.init,
               **_method_options(config.method, config.method_options)}
    if get_method(config.method).needs_frequencies and frequencies is None:
        frequencies = {f.name: torch.zeros(f.num_embeddings, dtype=torch.int64) for f in features}
    embeddings = EmbeddingCollection(features, config.embedding_dim, config.method, compression=config.compression,
                                     seed=config.seed, frequencies=frequencies, sharing=config.sharing, **options)
    if config.model == "dlrm":
        return DLRM(embeddings, num_dense, config.bottom, config.top)
    return DCNv2(embeddings, num_dense, deep=config.top)


def id_counts(split: Split, cardinalities: list[int], chunk_rows: int = 1 << 20) -> list[np.ndarray]:
    """How often each id occurs in each sparse column of ``split``: one int64 array per feature.

    Reads the memory-mapped ids ``chunk_rows`` rows at a time, so a split of any size needs one chunk of memory.
    """
    counts = [np.zeros(n, dtype=np.int64) for n in cardinalities]
    for start in range(0, len(split), chunk_rows):
        chunk = np.asarray(split.sparse[start : start + chunk_rows])
        for column, n in enumerate(cardinalities):
            counts[column] += np.bincount(chunk[:, column], minlength=n)[:n]
    return counts


def _method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``method``, less the schedule options (:data:`SCHEDULE_OPTIONS`) it does not take.

    A sweep gives every method the same options; ``cluster_every`` only means something to methods that cluster.
    """
    takes = method_options(get_method(method))
    return {key: value for key, value in options.items() if key not in SCHEDULE_OPTIONS or key in takes}


def _make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=lr)
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    track_row_steps(adam)  # rows that change owner (CAFE, CCE) keep their own Adam step, across resumes too
    return adam


def _batch(split: Split, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rows(split, slice(index * batch_size, (index + 1) * batch_size))


def _rows(split: Split, rows: slice | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dense = torch.from_numpy(np.array(split.dense[rows], dtype=np.float32))
    sparse = torch.from_numpy(np.array(split.sparse[rows], dtype=np.int64))
    labels = torch.from_numpy(np.array(split.labels[rows], dtype=np.float32))
    return dense, sparse, labels
