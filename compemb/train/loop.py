"""The training loop (:class:`Trainer`): fit, one step, evaluation, checkpoints written and loaded, resume."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from compemb import cuda_graph, distributed
from compemb.embeddings.base import CompressedEmbedding
from compemb.kernels import use_kernels
from compemb.outputs import check_output_directory
from compemb.progress import bar_disabled, plain_lines
from compemb.run_config import write_run_config
from compemb.train.batches import TrainBatches
from compemb.train.build import (
    build_model,
    data_parallel,
    make_optimizer,
    open_training_data,
    refuse_what_memory_cannot_hold,
    set_learning_rates,
    train_frequencies,
)
from compemb.train.checkpoints import (
    CheckpointError,
    check_resumable,
    find_checkpoint,
    is_complete,
    no_checkpoint,
    publish_next,
    read_meta,
    restore_checkpoint,
    write_checkpoint,
)
from compemb.train.config import OVERRIDABLE, EvaluationSteps, TrainConfig
from compemb.train.evaluation import evaluate_split, gap_to_bayes
from compemb.train.run_dir import BEST, CHECKPOINTS, LAST, NEXT, claim_run_directory, lock_run_directory
from compemb.train.run_log import RunLog, evaluation_line
from compemb.train.step import TrainStep

POSTFIX_EVERY = 25  # steps between updates of the progress bar's loss and samples/s


class _Throughput:
    """Training samples per second since the loop started, the time spent evaluating and checkpointing left out."""

    def __init__(self) -> None:
        self.started, self.samples, self.pausing_s = time.perf_counter(), 0, 0.0

    def samples_per_s(self) -> float:
        return self.samples / max(time.perf_counter() - self.started - self.pausing_s, 1e-9)


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
        self.manifest, self.splits = open_training_data(self.config)
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
        frequencies = train_frequencies(config, self.splits["train"], cardinalities, self.bags)
        num_dense = self.splits["train"].dense.shape[1]
        refuse_what_memory_cannot_hold(config, cardinalities, num_dense)
        # nccl reduces no sparse gradients: under torchrun on CUDA the (small) tables take dense ones
        sparse = None if self.world == 1 or self.device.type == "cpu" else False
        self.model = build_model(config, cardinalities, num_dense, frequencies, sparse=sparse, bags=self.bags).to(
            self.device
        )
        self.optimizer = make_optimizer(config, self.model)
        self.train_model: torch.nn.Module = data_parallel(self.model, self.device) if self.world > 1 else self.model
        # the compiled module shares the model's parameters; checkpoints save the model itself (no _orig_mod keys)
        # (torch.compile of a Module is a Module, an OptimizedModule; its stub says a callable)
        self.train_model = (
            cast(torch.nn.Module, torch.compile(self.train_model)) if config.compile else self.train_model
        )
        if config.cuda_graph:
            why = "it trains in one process" if self.world > 1 else cuda_graph.refusal(self.model, self.optimizer)
            if why is not None:
                raise ValueError(f"cuda_graph: no CUDA graph can replay this run's step: {why}")
            cuda_graph.prepare(self.model, self.optimizer)

    def _start_counting(self) -> None:
        """Step 0 of the run's schedule: its length, when it evaluates, the loss's moving average and flags."""
        config = self.config
        self.prefetch = self.device.type != "cpu"  # read the next batch on a thread (see fit)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.batches = TrainBatches(self.splits["train"], config.batch_size, config.shuffle, config.seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = self.steps_per_epoch * config.epochs
        self.evaluation_steps = EvaluationSteps(
            self.steps_per_epoch, config.epochs, config.evals_per_epoch, config.eval_every
        )
        model, rows, stop = self.model, self.batches.global_rows, self._stop_if_not_finite
        self.stepper = TrainStep(
            model, self.train_model, self.optimizer, self.bags, self.device, config.batch_size, rows, stop
        )
        self._last_checkpoint = (0, time.monotonic())  # (step, when) of the last checkpoint written or loaded

    def _set_progress(self, quiet: bool, log_every: int, tensorboard: str | os.PathLike | None) -> None:
        """What the run shows and writes as it trains (:class:`RunLog`)."""
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be an int >= 0, got {log_every!r}")
        self.quiet, self.log_every = quiet, log_every
        self.run_log = RunLog(self.out, self.rank, tensorboard)

    def _resume(self, resume_from: str, start_if_missing: bool, allow_changes: tuple[str, ...]) -> None:
        """Load the run's checkpoint ``resume_from`` (none: start afresh where allowed), its config checked."""
        stem = find_checkpoint(self.out, resume_from)
        if stem is None:
            if not start_if_missing:
                raise no_checkpoint(self.out, resume_from)
            print(f"compemb: no checkpoint in {self.out}: starting fresh", file=sys.stderr)
            return
        check_resumable(stem, self.config, allow_changes)
        self.load(stem)
        self.run_log.forget_after(self.step)
        self._resumed = True
        self._repair_best()
        set_learning_rates(self.optimizer, self.config)  # an allowed new lr wins over the checkpoint's

    def fit(self, stop_at: int | None = None, final_evaluation: bool = True) -> dict[str, Any]:
        """Train to the end (or to step ``stop_at``, as an interruption would); return the last evaluation
        (``final_evaluation=False``: where none fell in the steps trained, ``{"step": ...}`` alone, as a benchmark
        timing training steps wants).

        The run directory is locked meanwhile (:class:`compemb.run_lock.RunLock`, held by rank 0): a second
        trainer into it is refused at once with a RunLockedError."""
        lock = lock_run_directory(self.out, self.rank, self.device)
        try:
            self.run_log.open()
            return self._fit(stop_at, final_evaluation)
        finally:
            self.run_log.close()
            lock.release()

    def _fit(self, stop_at: int | None, final_evaluation: bool = True) -> dict[str, Any]:
        config = self.config
        if not self._resumed and self.step == 0:
            claim_run_directory(self.out, self.overwrite, self.rank)
            self._last_checkpoint = (0, time.monotonic())
        if self.rank == 0:  # the settings it trains with (a resumed run's may have changed), as --config reads them
            write_run_config(self.out, config)
        stop = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        adaptive = [m for m in self.model.modules() if isinstance(m, CompressedEmbedding)]
        for module in adaptive:  # schedules given as a fraction of the run (CCE's cluster_until) need its length
            module.on_train_begin(self.total_steps, self.steps_per_epoch)
        result: dict[str, Any] = {}
        # a context: the bar is closed before an error propagates, so the error is the last line printed
        # on an accelerator one background thread reads and pins the next batch while the device trains; only it then
        # calls the batches' rows, in step order, so the batches are exactly those of a loop without it. On CPU the
        # thread would compete with torch's own for the cores: measured 0.935x the minimal loop against 1.012x
        shown = self.rank == 0 and not self.quiet
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
            self._clock = _Throughput()
            upcoming = reader.submit(self.prepared_batch, self.step) if self.prefetch and self.step < stop else None
            while self.step < stop:
                # batch -> forward/backward -> step -> methods' own hooks -> log -> evaluate/checkpoint
                batch = upcoming.result() if upcoming is not None else self.prepared_batch(self.step)
                if self.prefetch and self.step + 1 < stop:
                    upcoming = reader.submit(self.prepared_batch, self.step + 1)
                global_rows = self.batches.global_rows(self.step)
                self.train_step(batch, adaptive)
                self._clock.samples += global_rows
                self._show_progress(bar, stop, terminal=plain_lines(shown) and self.log_every > 0)
                if self.step in self.evaluation_steps:
                    result = self._evaluate_and_checkpoint(adaptive, shown)
                elif self._checkpoint_due():
                    self._write_last()
        self._stop_if_not_finite()
        distributed.barrier()  # rank 0's checkpoints are written when any rank returns
        if not result and not final_evaluation:
            result = {"step": self.step}
        elif not result:  # nothing left to train (a finished run resumed): its last evaluation, as it logged it
            result = self.run_log.last_record(self.step) or {"step": self.step, **self.evaluate(config.eval_split)}
        return result

    def _show_progress(self, bar: tqdm, stop: int, terminal: bool) -> None:
        """The bar's loss and samples/s (every POSTFIX_EVERY steps), and every ``log_every`` steps a line in the log
        (on the terminal where ``terminal``: a log file gets plain lines, a terminal a bar) and TensorBoard."""
        if self.step % POSTFIX_EVERY == 0 and not bar.disable:  # formatting it costs ~1% of a step
            bar.set_postfix(
                loss=f"{self.running_loss:.4f}", refresh=False, samples_s=f"{self._clock.samples_per_s():,.0f}"
            )
        bar.update(1)
        if self.log_every and (self.step % self.log_every == 0 or self.step == stop):
            self._stop_if_not_finite()  # the line reads the loss anyway
            # every rank: the line gives the loss over all ranks, as the evaluations' train_loss does
            loss, rate = self._mean_over_ranks(self.running_loss), self._clock.samples_per_s()
            self.run_log.say(
                f"train {self.config.method}: step {self.step:,}/{stop:,}, loss {loss:.4f}, {rate:,.0f} samples/s",
                terminal=terminal,
            )
            self.run_log.training_scalars(loss, rate, self.step)

    def _evaluate_and_checkpoint(self, adaptive: list[CompressedEmbedding], shown: bool) -> dict[str, Any]:
        """An evaluation on the run's split, logged and checkpointed (best where it improved, then last); its time
        is not counted as training's."""
        samples_per_s = self._clock.samples_per_s()  # training throughput: evaluating and checkpointing is not
        paused = time.perf_counter()
        self._stop_if_not_finite()  # (on the device path: the one read of the flag)
        result = self.evaluate(self.config.eval_split)
        result["train_loss"] = self._mean_over_ranks(self.running_loss)
        for module in adaptive:  # the methods' own counters (CCE: clusterings), the most of any table
            for key, count in module.progress().items():
                result[key] = max(result.get(key, 0), count)
        result["samples_per_s"] = samples_per_s
        self.run_log.record(result)
        self._checkpoint(result)
        self.run_log.say(evaluation_line(result, self.total_steps, self.steps_per_epoch, self.best), terminal=shown)
        self._clock.pausing_s += time.perf_counter() - paused
        return result

    def _stop_if_not_finite(self, loss: float | None = None) -> None:
        """Raise NonFiniteLossError if a step's loss was not finite (checked before every evaluation, log line and
        checkpoint: a diverged state is never saved)."""
        bad = int(self.stepper.first_bad_step)
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

    def train_step(self, batch: tuple[torch.Tensor, ...], adaptive: list[CompressedEmbedding]) -> None:
        """One step on a batch as :meth:`prepared_batch` gives it: forward, backward, the optimizer's step, the
        methods' own hooks (``adaptive``: the model's tables), the running loss. Nothing in it reads the device
        back unless a method's algorithm must (``compemb bench syncs`` counts what does)."""
        if self.config.cuda_graph:
            self.stepper.graphed(batch, self.step, adaptive, self._to_device)
        else:
            self.stepper.body(self._to_device(batch), self.step, adaptive)
        self.step += 1

    def _checkpoint_due(self) -> bool:
        """A checkpoint between evaluations: every ``checkpoint_every`` steps, after ``checkpoint_minutes``, and at
        the end of each epoch."""
        config, (step, when) = self.config, self._last_checkpoint
        if config.checkpoint_epochs and self.step % self.steps_per_epoch == 0:
            return True
        if config.checkpoint_every and self.step - step >= config.checkpoint_every:
            return True
        return bool(config.checkpoint_minutes) and time.monotonic() - when >= 60 * config.checkpoint_minutes

    def _train_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """The batch of 0-based ``step`` (see :class:`TrainBatches`)."""
        return self.batches.rows(step)

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
        return float(self.stepper.running_loss)

    @running_loss.setter
    def running_loss(self, value: float) -> None:
        self.stepper.running_loss.fill_(value)

    def prepared_batch(self, step: int) -> tuple[torch.Tensor, ...]:
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
        if self.stepper.graph is not None:  # what an evaluation makes is not what the captured step reads
            self.stepper.graph.invalidate()
        if split not in self.splits:
            raise ValueError(f"no split {split!r} in {self.config.data}; it has {list(self.splits)}")
        if self.splits[split].labels is None:
            raise ValueError(f"split {split!r} of {self.config.data} has no labels to evaluate against")
        result = evaluate_split(self.model, self.splits[split], self.bags, self.config.eval_batch_size, self._to_device)
        return {"step": self.step, "split": split, **result, **gap_to_bayes(result["bce"], self.manifest, split)}

    def _checkpoint(self, result: dict[str, Any]) -> None:
        improved = self.best is None or result["bce"] < self.best["bce"]
        if improved:
            self.best = result
            if self.rank == 0:  # before last: a kill between the two never leaves best behind last
                self._save_or_say_why(self.out / CHECKPOINTS / BEST)
        self._write_last()

    def _write_last(self) -> None:
        """The newest checkpoint, written so that a crash at any point leaves a complete one to resume from: the
        new one is written whole as ``next``, then published as ``last`` (:func:`publish_next`)."""
        self._last_checkpoint = (self.step, time.monotonic())
        if self.rank != 0:  # the ranks' states are identical: rank 0 writes it, every rank resumes from it
            return
        self._save_or_say_why(self.out / CHECKPOINTS / NEXT)
        publish_next(self.out / CHECKPOINTS)
        self._last_checkpoint = (self.step, time.monotonic())

    def save(self, stem: Path) -> None:
        """Write ``stem.safetensors`` (tensors) and ``stem.json`` (the rest), each atomically."""
        meta = {"config": asdict(self.config), "step": self.step, "best": self.best, "running_loss": self.running_loss}
        write_checkpoint(stem, self.model, self.optimizer, meta, self.step)

    def load(self, stem: Path) -> None:
        """Restore model, optimizer, step, best result and RNG state from ``stem`` (CheckpointError if damaged)."""
        meta = restore_checkpoint(stem, self.model, self.optimizer, self.trust_unverified)
        self.step, self.best = meta["step"], meta["best"]
        self.stepper.forget_graph()  # (--cuda-graph: captured again from the loaded state)
        self.running_loss = meta.get("running_loss", 0.0)
        self._last_checkpoint = (self.step, time.monotonic())
