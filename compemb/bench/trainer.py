"""The trainer's own cost: ``Trainer.fit`` against a minimal hand-written loop of the same model and data.

Both build the model the config describes (:func:`compemb.train.build_model`, the same seed: the same weights) and
the same optimizer, and read the same batches from the memory-mapped split in file order; the minimal loop is the
five lines a user would write (batch, forward, loss, backward, step, plus each method's ``on_step_end`` hook, which
adaptive methods need). They take turns (ABBA...) training blocks of ``steps`` steps from where they left off, and
the median of the per-block ratios is reported: samples/s of the trainer / samples/s of the minimal loop (issue 13's
target: >= 0.97). Load from elsewhere on the machine falls on both.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time

import torch

from compemb.embeddings.base import CompressedEmbedding
from compemb.io import atomic_write_text
from compemb.train import TrainConfig, Trainer, build_model, make_optimizer, read_batch, train_frequencies, unpack_batch

TARGET = 0.97


class MinimalLoop:
    """The loop a user writes by hand, over the model and optimizer the config describes."""

    def __init__(self, trainer: Trainer) -> None:
        config = trainer.config
        self.split, self.batch_size = trainer.splits["train"], config.batch_size
        self.steps_per_epoch = trainer.steps_per_epoch
        self.bags = trainer.bags  # the multi-hot features, read and pooled as the trainer does
        cardinalities = trainer.manifest["cardinalities"]
        counts = train_frequencies(config, self.split, cardinalities, self.bags)  # (offline methods: ids counted)
        self.model = build_model(config, cardinalities, self.split.dense.shape[1], counts, bags=self.bags)
        self.optimizer = make_optimizer(config, self.model)
        self.hooked = [
            m
            for m in self.model.modules()
            if isinstance(m, CompressedEmbedding) and type(m).on_step_end is not CompressedEmbedding.on_step_end
        ]
        self.step = 0

    def run(self, steps: int) -> None:
        """Train ``steps`` more steps."""
        for _ in range(steps):
            batch = read_batch(self.split, self.step % self.steps_per_epoch, self.batch_size)
            dense, sparse, labels, bags = unpack_batch(batch, self.bags)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.model(dense, sparse, bags), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for module in self.hooked:
                module.on_step_end(self.step, self.optimizer)
            self.step += 1


def measure_trainer_overhead(base: TrainConfig, rounds: int = 7, steps: int = 30) -> dict:
    """Alternate blocks of the trainer and the minimal loop; the median ratio of their samples/s and both rates."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    config = dataclasses.replace(
        base, epochs=10**6, eval_every=0, evals_per_epoch=0, checkpoint_minutes=0, checkpoint_epochs=False
    )  # steps only: no evaluation or checkpoint in the blocks
    trainer = Trainer(config, overwrite=True)
    minimal = MinimalLoop(trainer)
    # final_evaluation=False: a block that ends without an evaluation returns at once (fit would otherwise evaluate
    # the split at each block's end, as an interrupted run's caller wants, and time it as the trainer's)
    trainer.fit(stop_at=3, final_evaluation=False)  # warm up both: the first steps allocate optimizer state
    minimal.run(3)
    seconds: dict[str, list[float]] = {"trainer": [], "minimal": []}
    for index in range(rounds):
        for name in ("trainer", "minimal") if index % 2 == 0 else ("minimal", "trainer"):
            started = time.perf_counter()
            trainer.fit(trainer.step + steps, final_evaluation=False) if name == "trainer" else minimal.run(steps)
            seconds[name].append(time.perf_counter() - started)
    samples = steps * config.batch_size
    ratios = [m / t for m, t in zip(seconds["minimal"], seconds["trainer"])]
    return {
        "ratio": statistics.median(ratios),
        "trainer_samples_per_s": samples / statistics.median(seconds["trainer"]),
        "minimal_samples_per_s": samples / statistics.median(seconds["minimal"]),
        "target": TARGET,
        "rounds": rounds,
        "steps": steps,
        "method": config.method,
        "optimizer": config.optimizer,
        "batch_size": config.batch_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": str(datetime.date.today()),
        "data": config.data,
    }


def write_overhead(result: dict, output: str) -> str:
    """``output``.md and .json; the markdown text."""
    met = "met" if result["ratio"] >= result["target"] else f"MISSED by {result['target'] - result['ratio']:.3f}"
    text = (
        f"`compemb train` against a minimal loop of the same model and data ({result['method']}, "
        f"{result['optimizer']}, batch {result['batch_size']:,}; {result['rounds']} alternating rounds of "
        f"{result['steps']} steps; torch {result['torch']}, {result['threads']} threads, {result['date']}; data "
        f"{result['data']}).\n\n| loop | samples/s |\n|---|---:|\n"
        f"| minimal | {result['minimal_samples_per_s']:,.0f} |\n| compemb Trainer | "
        f"{result['trainer_samples_per_s']:,.0f} |\n\nTrainer / minimal (median of per-round ratios): "
        f"**{result['ratio']:.3f}x**; target >= {result['target']}: {met}.\n"
    )
    atomic_write_text(f"{output}.md", text)
    atomic_write_text(f"{output}.json", json.dumps(result, indent=2) + "\n")
    return text
