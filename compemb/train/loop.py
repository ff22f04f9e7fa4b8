"""The training loop (:class:`Trainer`): fit, one step, evaluation, checkpoints written and loaded, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from compemb import cuda_graph, distributed
from compemb.collection import EmbeddingCollection
from compemb.data.dataset import DatasetError, open_dataset
from compemb.data.validate import validate_dataset
from compemb.embeddings.adaptive import end_step
from compemb.embeddings.base import CompressedEmbedding
from compemb.feature_methods import any_method
from compemb.io import atomic_path, atomic_write_text, sha256_of_file
from compemb.kernels import on_host, use_kernels
from compemb.metrics import auc, bce
from compemb.outputs import check_output_directory, check_output_file
from compemb.progress import bar_disabled, plain_lines
from compemb.run_config import write_run_config
from compemb.run_lock import RunLock, RunLockedError
from compemb.run_plot import CURVES
from compemb.train.batches import read_rows, unpack_batch
from compemb.train.build import (
    bag_counts,
    build_model,
    check_trainable,
    counted_by_every_rank,
    make_optimizer,
    refuse_what_memory_cannot_hold,
    set_learning_rates,
)
from compemb.train.checkpoints import (
    KILL_WHILE_WRITING,
    CheckpointError,
    find_checkpoint,
    is_complete,
    load_model_state,
    no_checkpoint,
    read_checkpoint,
    read_config,
    read_meta,
)
from compemb.train.config import OVERRIDABLE, RESULT_NEUTRAL, EvaluationSteps, TrainConfig, settings_that_differ
from compemb.train.run_dir import (
    BEST,
    CHECKPOINTS,
    LAST,
    LOG_FILE,
    NEXT,
    PREVIOUS,
    RunExistsError,
    is_run_log,
    remove_stale_temporaries,
    run_files,
)

POSTFIX_EVERY = 25  # steps between updates of the progress bar's loss and samples/s


class NonFiniteLossError(ValueError):
    """A training step's loss was NaN or infinite: training stops before anything of it is saved."""


class Trainer:
    """Builds the model for a config and data set, then trains, evaluates and checkpoints it.

    Example::

        >>> trainer = Trainer(TrainConfig(data="data/synth", out="runs/hash100", method="hash", compression=100))  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
        {'step': 977, 'split': 'val', 'bce': 0.4012, 'auc': 0.8312, ...}
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        *,
        start_if_missing: bool = False,
        resume_from: str = LAST,
        allow_changes: tuple[str, ...] = (),
        overwrite: bool = False,
        quiet: bool = False,
        log_every: int = 100,
        tensorboard: str | os.PathLike | None = None,
        trust_unverified: bool = False,
    ) -> None:
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
            raise ValueError(
                f"cannot change {bad} when resuming; the settings that may change: {', '.join(OVERRIDABLE)}"
            )
        self.config, self.trust_unverified = config, trust_unverified
        self.out = Path(config.out)
        check_output_directory(self.out, inputs=[("--data", config.data)])  # before any work
        self._open_data()
        torch.manual_seed(config.seed)
        # sparse gradients are built by torch's own kernels: opt out of re-checking them, explicitly (the default)
        torch.sparse.check_sparse_tensor_invariants.disable()
        self._join_device()
        self._build()
        self._start_counting()
        # --resume-or-start with nothing to resume starts afresh: what a run left before its first checkpoint goes
        self.overwrite, self._resumed = overwrite or (resume and start_if_missing), False
        self._set_progress(quiet, log_every, tensorboard)
        if resume:
            self._resume(resume_from, start_if_missing, allow_changes)

    def _open_data(self) -> None:
        """The data set: its splits there, every value checked (once per data set), a run that could end."""
        config = self.config
        self.manifest, self.splits = open_dataset(config.data)
        for split in ("train", config.eval_split):
            if split not in self.splits:
                raise DatasetError(
                    f"{config.data} has no split {split!r} to train or evaluate on (it has {', '.join(self.splits)})"
                )
        # every id, label and dense value checked before training (once per data set: the pass is remembered)
        validate_dataset(config.data, self.manifest, self.splits)
        check_trainable(config, self.splits)
        self.bags = list(self.manifest.get("bags", ()))  # the multi-hot features, if the data set has any

    def _join_device(self) -> None:
        """The device, and under torchrun (WORLD_SIZE > 1) the process group: each rank trains on its slice of
        every batch."""
        config = self.config
        self.device = distributed.init(config.device) if distributed.launched() else torch.device(config.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: this torch sees no CUDA device")

    def _build(self) -> None:
        """The model, its optimizers and the module that trains it (DDP under torchrun, compiled, graph-ready)."""
        config, cardinalities = self.config, self.manifest["cardinalities"]
        frequencies = None
        if any_method(config.method, "needs_frequencies"):  # offline methods: ids counted in the train split
            frequencies = {
                f"C{i + 1}": torch.from_numpy(c)
                for i, c in enumerate(counted_by_every_rank(self.splits["train"], cardinalities))
            }
            frequencies.update(bag_counts(self.splits["train"], self.bags))
        num_dense = self.splits["train"].dense.shape[1]
        refuse_what_memory_cannot_hold(config, cardinalities, num_dense)
        # nccl reduces no sparse gradients: under torchrun on CUDA the (small) tables take dense ones
        sparse = None if self.world == 1 or self.device.type == "cpu" else False
        self.model = build_model(config, cardinalities, num_dense, frequencies, sparse=sparse, bags=self.bags).to(
            self.device
        )
        self.optimizer = make_optimizer(config, self.model)
        self._table_parameters = [
            p for m in self.model.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters(recurse=False)
        ]
        self.train_model: torch.nn.Module = self._data_parallel() if self.world > 1 else self.model
        # the compiled module shares the model's parameters; checkpoints save the model itself (no _orig_mod keys)
        self.train_model = torch.compile(self.train_model) if config.compile else self.train_model
        self._graph: cuda_graph.StepGraph | None = None  # --cuda-graph: the captured step (made at the first)
        self._step_counter: Tensor | None = None  # --cuda-graph: the step number on the device
        if config.cuda_graph:
            why = "it trains in one process" if self.world > 1 else cuda_graph.refusal(self.model, self.optimizer)
            if why is not None:
                raise ValueError(f"cuda_graph: no CUDA graph can replay this run's step: {why}")
            cuda_graph.prepare(self.model, self.optimizer)

    def _data_parallel(self) -> torch.nn.Module:
        """The model under DDP: the MLPs' gradients are DDP's; the tables' (sparse: DDP buckets sparse gradients only
        from nn.Embedding) are averaged after backward (distributed.average_gradients); sketches, pointers and other
        buffers stay identical because every rank applies the same gathered updates (compemb.distributed)."""
        model = self.model
        tables = {name for name, m in model.named_modules() if isinstance(m, CompressedEmbedding)}
        ignored = [
            f"{module}.{name}"
            for module in tables
            for name, _ in [
                *model.get_submodule(module).named_parameters(recurse=False),
                *model.get_submodule(module).named_buffers(recurse=False),
            ]
        ]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None, forward_sync_buffers=False
        )

    def _start_counting(self) -> None:
        """Step 0 of the run's schedule: its length, when it evaluates, the loss's moving average and flags."""
        config = self.config
        self.prefetch = self.device.type != "cpu"  # read the next batch on a thread (see fit)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.steps_per_epoch = math.ceil(len(self.splits["train"]) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.evaluation_steps = EvaluationSteps(
            self.steps_per_epoch, config.epochs, config.evals_per_epoch, config.eval_every
        )
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row permutation) when shuffling
        # the loss's moving average stays on the device: reading a CUDA loss every step would wait for the step
        self._running_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        # the first step whose loss was not finite (-1: none), kept on the device on the device code path (reading
        # the loss every step would make a GPU wait); on the host the loss is checked at once, before backward
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._last_checkpoint = (0, time.monotonic())  # (step, when) of the last checkpoint written or loaded

    def _set_progress(self, quiet: bool, log_every: int, tensorboard: str | os.PathLike | None) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be an int >= 0, got {log_every!r}")
        self.quiet, self.log_every = quiet, log_every
        self._tensorboard_dir, self._tensorboard = tensorboard, None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (checked now, opened when training)
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None

    def _resume(self, resume_from: str, start_if_missing: bool, allow_changes: tuple[str, ...]) -> None:
        """Load the run's checkpoint ``resume_from`` (none: start afresh where allowed), its config checked."""
        stem = find_checkpoint(self.out, resume_from)
        if stem is None:
            if not start_if_missing:
                raise no_checkpoint(self.out, resume_from)
            print(f"compemb: no checkpoint in {self.out}: starting fresh", file=sys.stderr)
            return
        self._check_config(stem, allow_changes)
        self.load(stem)
        self._forget_evaluations_after(self.step)
        self._resumed = True
        self._repair_best()
        set_learning_rates(self.optimizer, self.config)  # an allowed new lr wins over the checkpoint's

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
            refused = refused or (
                f"{self.out} is being trained by another process" if distributed.all_reduce_sum(flag).item() else ""
            )
        if refused:
            raise RunLockedError(refused)
        if self.rank == 0:  # under the lock no write is under way: what a killed write left is stale
            remove_stale_temporaries(self.out / CHECKPOINTS)
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
        with (
            tqdm(
                total=stop,
                initial=self.step,
                desc=f"train {config.method}",
                unit="step",
                disable=True if plain_lines(shown) else bar_disabled(shown),
            ) as bar,
            use_kernels(config.kernels),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="compemb-batches") as reader,
        ):
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
                    bar.set_postfix(
                        loss=f"{self.running_loss:.4f}",
                        refresh=False,
                        samples_s=f"{samples / (time.perf_counter() - started - pausing_s):,.0f}",
                    )
                bar.update(1)
                if self.log_every and (self.step % self.log_every == 0 or self.step == stop):
                    self._stop_if_not_finite()  # the line reads the loss anyway
                    # every rank: the line gives the loss over all ranks, as the evaluations' train_loss does
                    loss = self._mean_over_ranks(self.running_loss)
                    rate = samples / max(time.perf_counter() - started - pausing_s, 1e-9)
                    self._say(
                        f"train {config.method}: step {self.step:,}/{stop:,}, loss {loss:.4f}, {rate:,.0f} samples/s",
                        terminal=lines,
                    )
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
                raise CheckpointError(
                    f"{path}:{number}: not an evaluation record (a JSON object with a step): the "
                    f"file was edited or damaged; remove that line to resume"
                )
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
        last = (
            f"the last good checkpoint is {kept} (step {read_meta(kept)['step']})"
            if kept
            else "no checkpoint was written before it"
        )
        value = "" if loss is None else f" ({loss})"
        raise NonFiniteLossError(
            f"the training loss was not finite{value} at step {bad + 1}: training stopped, "
            f"nothing of it saved; {last}. Check the data (non-finite dense values?) and the "
            f"learning rates"
        )

    def _save_or_say_why(self, stem: Path) -> None:
        """:meth:`save`, or a CheckpointError saying what could not be written and which checkpoint is intact."""
        self._stop_if_not_finite()
        try:
            self.save(stem)
        except (OSError, SafetensorError) as error:  # a full disk, say: what was written before is untouched
            kept = find_checkpoint(self.out)
            intact = f"the checkpoint {kept} (step {read_meta(kept)['step']}) is intact" if kept else "none was kept"
            raise CheckpointError(
                f"could not write the checkpoint of step {self.step} in {stem.parent} ({error}); {intact}"
            ) from None

    def _repair_best(self) -> None:
        """After a resume: where the state just loaded is the best one and ``best`` lags behind it (a run killed
        between writing last and best, before compemb wrote best first), write it as best again."""
        best = self.out / CHECKPOINTS / BEST
        if self.rank != 0 or not self.best or self.best.get("step") != self.step:
            return
        if not is_complete(best) or read_meta(best).get("step", -1) < self.step:
            self.save(best)

    def _claim_run_directory(self) -> None:
        """Before a fresh run writes anything: refuse an ``out`` that holds another run, or (``overwrite``) remove
        that run's files, and only them."""
        files = run_files(self.out)
        log = self.out / LOG_FILE
        if (log.exists() or log.is_symlink()) and not is_run_log(log):  # a user's file: never appended to or removed
            raise RunExistsError(
                f"{log} is not a log a compemb run wrote: it is left as it is; move it, or give another --out"
            )
        if not self.overwrite:  # the curves `compemb train` draws at the end would replace a user's PNG
            check_output_file(self.out / CURVES, "png")
        distributed.barrier()  # every rank has looked before rank 0 removes anything
        if files and not self.overwrite:
            raise RunExistsError(
                f"{self.out} holds a run ({', '.join(str(f.relative_to(self.out)) for f in files[:3])}"
                f"{', ...' if len(files) > 3 else ''}): --resume continues it, --overwrite replaces "
                f"it (Trainer(overwrite=True)), or give another --out"
            )
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
        dense, sparse, labels, bags = unpack_batch(batch, self.bags)
        logits = self.train_model(dense, sparse, bags)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        step = self.step if self._step_counter is None else self._step_counter  # (a graph replays no host value)
        if on_host(loss):
            if not math.isfinite(float(loss.detach())):  # before backward: nothing of this step reaches the weights
                self._first_bad_step.fill_(self.step)
                self._stop_if_not_finite(float(loss.detach()))
        else:
            self._first_bad_step.copy_(
                torch.where((self._first_bad_step < 0) & ~torch.isfinite(loss), step, self._first_bad_step)
            )
        if self.world > 1:  # DDP averages over ranks: each rank's mean weighted by its share of the batch
            loss = loss * (len(labels) * self.world / self._global_rows(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self._table_parameters)  # (one process: nothing to do)
        self.optimizer.step()
        # the methods' updates: under torchrun every table's recorded importance gathered in one collective, the
        # tables that update together (per-feature CAFE on a device) at once, then each table's own hook
        batches = [
            batch for m in self.model.modules() if isinstance(m, EmbeddingCollection) for batch in m.table_batches()
        ]
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
            return read_rows(train, slice(low, high))
        if self._order is None or self._order[0] != epoch:  # a function of (seed, epoch) alone: resumes see the same
            self._order = (epoch, np.random.default_rng([self.config.seed, epoch]).permutation(len(train)))
        # sorted within the batch: the same rows (the loss is their mean), read in file order from the memory map
        return read_rows(train, np.sort(self._order[1][start:stop])[low - start : high - start])

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
        logits = distributed.gather_rows(
            torch.cat(
                [
                    self._logits(read_rows(data, slice(start, min(start + size, high))))
                    for start in range(
                        low, max(high, low + 1), size
                    )  # one (possibly empty) batch at least: cat needs one
                ]
            )
        ).cpu()
        self.model.train()
        labels = torch.from_numpy(np.asarray(data.labels, dtype=np.float32))
        result = {"step": self.step, "split": split, "bce": bce(logits, labels), "auc": auc(logits, labels)}
        bayes = self.manifest.get("bayes", {}).get(split)
        if bayes:
            result["bayes_bce"] = bayes["bce"]
            result["gap_to_bayes"] = result["bce"] / bayes["bce"] - 1
        return result

    def _logits(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The model's logits for a batch of ``read_rows`` (on the model's device)."""
        dense, sparse, _, bags = unpack_batch(self._to_device(batch), self.bags)
        return self.model(dense, sparse, bags)

    def _evaluation_line(self, result: dict[str, Any]) -> str:
        """One evaluation as a person reads it, with the best so far (the checkpoint ``best`` holds)."""
        line = (
            f"eval {result['split']} at step {result['step']:,}/{self.total_steps:,} (epoch "
            f"{result['step'] / self.steps_per_epoch:.2f}): BCE {result['bce']:.4f}"
        )
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
        if is_complete(directory / LAST):
            for suffix in (".safetensors", ".json"):
                os.replace(directory / f"{LAST}{suffix}", directory / f"{PREVIOUS}{suffix}")
        for suffix in (".safetensors", ".json"):
            os.replace(directory / f"{NEXT}{suffix}", directory / f"{LAST}{suffix}")
        self._last_checkpoint = (self.step, time.monotonic())

    def save(self, stem: Path) -> None:
        """Write ``stem.safetensors`` (tensors) and ``stem.json`` (the rest), each atomically."""
        tensors = {
            f"model.{name}": value.detach().cpu().contiguous() for name, value in self.model.state_dict().items()
        }
        optimizer_state = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in optimizer_state["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "config": asdict(self.config),
            "step": self.step,
            "best": self.best,
            "running_loss": self.running_loss,
            "optimizer_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
        }
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
            raise CheckpointError(
                f"checkpoint {stem}: its optimizer state does not fit this run's optimizers "
                f"({type(error).__name__}: {error})"
            ) from None
        self.step, self.best = meta["step"], meta["best"]
        self._graph, self._step_counter = None, None  # (--cuda-graph: captured again from the loaded state)
        self.running_loss = meta.get("running_loss", 0.0)
        self._last_checkpoint = (self.step, time.monotonic())
