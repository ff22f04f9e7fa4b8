"""DLRM training speed of methods as a ratio to a baseline method, measured in one run.

Every method gets a Trainer on the same data and settings; they take turns (ABBA...) training blocks of
``steps`` steps from where they left off, and each method's block time is divided by the baseline's block
beside it. The median of those ratios is reported (a ratio below 1 is slower than the baseline: samples/s of
the method / samples/s of the baseline), so load from elsewhere on the shared machine cancels out.

``NAME+compile`` trains NAME through ``torch.compile`` (``TrainConfig.compile``): beside NAME it shows whether
compiling helps; its row's warm-up seconds include the compilation. ``NAME+torch`` trains NAME on the device code
path (``kernels="torch"``: torch ops where the CPU has compiled kernels), to compare the two on one machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from compemb.io import atomic_write_text
from compemb.registry import get_method
from compemb.train import TrainConfig, Trainer


@dataclasses.dataclass
class SpeedRow:
    """One method's median samples/s and its median ratio to the baseline's."""

    method: str
    samples_per_s: float
    ratio: float  # samples/s of the method / samples/s of the baseline, median over rounds
    target: float | None
    warmup_s: float = 0.0  # the first 3 steps (optimizer state, compiled kernels, torch.compile)


COMPILED = "+compile"
TORCH_KERNELS = "+torch"


def measure_training_speed(
    base: TrainConfig,
    methods: list[str],
    baseline: str,
    rounds: int = 7,
    steps: int = 20,
    targets: dict[str, float] | None = None,
) -> list[SpeedRow]:
    """Train every method and the baseline in alternation; return the baseline row first, then each method's."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    names = [baseline, *[m for m in methods if m != baseline]]
    trainers = {}
    for name in names:
        method = name.removesuffix(COMPILED).removesuffix(TORCH_KERNELS)
        kernels = "torch" if name.endswith(TORCH_KERNELS) else base.kernels
        trainers[name] = Trainer(
            dataclasses.replace(
                base,
                method=method,
                out=f"{base.out}/{name}",
                epochs=10**6,
                compile=name.endswith(COMPILED),
                kernels=kernels,
                compression=base.compression if get_method(method).compresses else None,
                checkpoint_minutes=0,
                checkpoint_epochs=False,
            )
        )  # timing steps only
    # CUDA runs ahead of Python: wait for a block's queued work before reading the clock
    sync = torch.cuda.synchronize if torch.device(base.device).type == "cuda" else (lambda: None)
    warmup: dict[str, float] = {}
    for name, trainer in trainers.items():  # warm up: first steps allocate optimizer state and compile kernels
        started = time.perf_counter()
        trainer.fit(trainer.step + 3, final_evaluation=False)  # (steps alone: no evaluation at a block's end)
        sync()
        warmup[name] = time.perf_counter() - started
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            trainer = trainers[name]
            started = time.perf_counter()
            trainer.fit(trainer.step + steps, final_evaluation=False)
            sync()
            seconds[name].append(time.perf_counter() - started)
    samples = steps * base.batch_size
    rows = []
    for name in names:
        ratios = [b / m for b, m in zip(seconds[baseline], seconds[name])]
        rows.append(
            SpeedRow(
                name,
                samples / statistics.median(seconds[name]),
                statistics.median(ratios),
                (targets or {}).get(name),
                warmup[name],
            )
        )
    return rows


def speed_table(rows: list[SpeedRow], baseline: str) -> str:
    """The rows as a markdown table."""
    lines = [
        f"| method | samples/s | x {baseline} | target | met | first 3 steps (s) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        target = f">= {row.target:g}" if row.target else ""
        met = "" if not row.target else ("yes" if row.ratio >= row.target else "NO")
        lines.append(
            f"| {row.method} | {row.samples_per_s:,.0f} | {row.ratio:.2f} | {target} | {met} | {row.warmup_s:.1f} |"
        )
    return "\n".join(lines)


def write_speed(
    rows: list[SpeedRow], base: TrainConfig, baseline: str, rounds: int, steps: int, output: str | Path
) -> str:
    """Write ``output``.md and .json (atomically); return the markdown."""
    settings = {
        "data": base.data,
        "dim": base.embedding_dim,
        "bottom": base.bottom,
        "top": base.top,
        "optimizer": base.optimizer,
        "batch_size": base.batch_size,
        "compression": base.compression,
        "rounds": rounds,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": base.device,
        "date": datetime.date.today().isoformat(),
    }
    text = (
        f"DLRM training speed against `{baseline}` (median of per-block ratios, {rounds} rounds of {steps} "
        f"alternating steps, batch {base.batch_size}, {base.optimizer}, compression {base.compression:g}, "
        f"dim {base.embedding_dim}; torch {settings['torch']}, {settings['threads']} threads, {base.device}, "
        f"{settings['date']}).\n\n" + speed_table(rows, baseline) + "\n"
    )
    atomic_write_text(f"{output}.md", text)
    atomic_write_text(
        f"{output}.json",
        json.dumps(
            {"settings": settings, "baseline": baseline, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2
        )
        + "\n",
    )
    return text
