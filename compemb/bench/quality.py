"""The quality sweep: one training per (method, compression, seed), then a table and plots.

Each run lives in ``OUT/runs/<method>-<ratio>x-s<seed>/`` and ends with ``result.json`` (with the run's
config); a run whose result exists with the same config is read back, so an interrupted sweep continues
where it stopped, and one made with other settings is trained again. A method that cannot meet a ratio
gets a row saying why. ``OUT/results.csv`` and ``OUT/results.md`` hold every row; ``OUT/bce.png`` and
``OUT/auc.png`` plot test BCE and AUC (:mod:`compemb.bench.sweep_plot`): at one ratio, the methods ranked best
first with their seed spread; at several, one line per method against the compression reached; the full table and
the Bayes-optimal value (where the data set knows it) as lines. ``OUT/comparison.md`` holds the verdicts: every method
against a baseline (``hash`` where it ran) at each ratio, with 95% intervals and p-values
(:mod:`compemb.bench.verdicts`). A method spec ``NAME+int8`` (``+int4``, ``+pq``) is
the post-training baseline: NAME's run (trained first if missing), its best checkpoint's tables quantized
(:func:`compemb.quantize`) and tested, as its own row at the compression the quantized tables reach.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compemb.bench.sweep_plot import Chart, Point, draw, save_png
from compemb.bench.sweep_plot import x_scale as x_scale  # where callers import it from
from compemb.bench.verdicts import comparison_table, default_baseline
from compemb.budget import full_table_bytes
from compemb.io import atomic_write_text
from compemb.quantize import SCHEMES, quantize
from compemb.registry import METHODS, parse_method_spec
from compemb.train import RESULT_NEUTRAL, TrainConfig, Trainer, settings_that_differ, with_defaults

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = (
    "method",
    "ratio_asked",
    "ratio_reached",
    "params",
    "seed",
    "val_bce",
    "test_bce",
    "test_auc",
    "bayes_bce",
    "gap_to_bayes",
    "samples_per_s",
    "note",
)


@dataclass
class SweepRow:
    """One run's outcome (or why it could not run)."""

    method: str
    ratio_asked: float
    seed: int
    ratio_reached: float | None = None
    params: int | None = None
    val_bce: float | None = None
    test_bce: float | None = None
    test_auc: float | None = None
    bayes_bce: float | None = None
    gap_to_bayes: float | None = None
    samples_per_s: float | None = None
    note: str = ""


def split_quantized(spec: str) -> tuple[str, str | None]:
    """``"cce+int8"`` -> ``("cce", "int8")``: a method trained as usual, then its tables quantized after training
    (:func:`compemb.quantize`) and tested; a spec without a ``+scheme`` suffix -> ``(spec, None)``."""
    base, plus, scheme = spec.rpartition("+")
    if plus and scheme in SCHEMES:
        return base, scheme
    return spec, None


def parse_sweep_spec(spec: str) -> tuple[str, dict[str, Any], str | None]:
    """A sweep's method spec: the registry name, its options, and the post-training quantization scheme if any."""
    base, scheme = split_quantized(spec)
    name, options = parse_method_spec(base)
    return name, options, scheme


def _compresses(spec: str) -> bool:
    base, scheme = split_quantized(spec)
    return scheme is not None or METHODS[parse_method_spec(base)[0]].compresses


def run_sweep(
    base: TrainConfig,
    methods: list[str],
    compressions: list[float],
    seeds: int,
    out: str,
    baseline: str | None = None,
    test: str = "welch",
) -> list[SweepRow]:
    """Train every (method, compression, seed) not already done under ``out``; write the tables and plots.

    ``methods`` are registry names, optionally with options (see :func:`parse_method_spec`); the verdicts compare
    each with ``baseline`` (default: :func:`~compemb.bench.verdicts.default_baseline`) by ``test``.
    """
    rows = []
    for method in methods:
        ratios = compressions if _compresses(split_quantized(method)[0]) else [1.0]  # full+int8: full's one run
        for ratio in ratios:
            for seed in range(seeds):
                rows.append(_run_one(base, method, ratio, seed, Path(out)))
    write_results(collect_rows(base, Path(out), first=methods), Path(out), baseline or default_baseline(methods), test)
    return rows


# what a sweep's runs may differ in; every other setting is shared by the rows of one table
_PER_RUN = ("method", "compression", "seed", "out", "method_options")


def _same_settings(saved: dict[str, Any], config: TrainConfig) -> bool:
    """Whether a finished run's saved config is ``config`` in everything that changes a result."""
    return not settings_that_differ(with_defaults(saved), json.loads(json.dumps(asdict(config))), ignore=RESULT_NEUTRAL)


def collect_rows(base: TrainConfig, out: Path, first: Sequence[str] = ()) -> list[SweepRow]:
    """Every finished run under ``out/runs`` made with ``base``'s shared settings, as rows.

    Ordered by method (``first``'s order, then the rest by name), then ratio asked, then seed.
    """
    shared = json.loads(json.dumps(asdict(base)))
    rows = []
    for result in sorted((out / "runs").glob("*/result.json")):
        saved = json.loads(result.read_text())
        config = with_defaults(saved.pop("config", {}))
        if not settings_that_differ(config, shared, ignore=(*_PER_RUN, *RESULT_NEUTRAL)):
            rows.append(SweepRow(**saved))
    order = {method: index for index, method in enumerate(first)}
    rows.sort(key=lambda r: (order.get(r.method, len(order)), r.method, r.ratio_asked, r.seed))
    return rows


def _run_dir(out: Path, method: str, ratio: float, seed: int) -> Path:
    """Where the run of one (method spec, ratio, seed) lives."""
    return out / "runs" / f"{method.replace(':', '-').replace('=', '-')}-{ratio:g}x-s{seed}"


def _run_one(base: TrainConfig, method: str, ratio: float, seed: int, out: Path) -> SweepRow:
    trained, scheme = split_quantized(method)
    if scheme is not None:
        return _run_quantized(base, trained, scheme, ratio, seed, out)
    name, options = parse_method_spec(method)
    run = _run_dir(out, method, ratio, seed)
    config = replace(
        base,
        method=name,
        compression=None if ratio == 1 else ratio,
        seed=seed,
        out=str(run),
        method_options={**base.method_options, **options},
    )
    if (run / "result.json").exists():
        saved = json.loads((run / "result.json").read_text())
        if _same_settings(saved.pop("config", {}), config):
            return SweepRow(**saved)
        shutil.rmtree(run)  # made with other settings: train again rather than report a stale result
    row = SweepRow(method, ratio, seed)
    try:
        trainer = Trainer(config, overwrite=True)  # a run an interrupted sweep left unfinished starts again
    except ValueError as error:  # the method cannot meet this budget: say why (kept, so it is not retried), go on
        row.note = str(error)
        atomic_write_text(run / "result.json", json.dumps({**asdict(row), "config": asdict(config)}, indent=2) + "\n")
        return row
    last = trainer.fit()
    test = trainer.test_of_best("test")  # the test metrics of the best validation checkpoint, as the papers report
    memory = trainer.model.embeddings.memory()
    full = sum(full_table_bytes(f.num_embeddings, config.embedding_dim) for f in trainer.model.embeddings.features)
    row.ratio_reached = full / memory.total
    row.params = memory.total // 4
    row.val_bce = trainer.best["bce"] if trainer.best else None
    row.test_bce, row.test_auc = test["bce"], test["auc"]
    row.bayes_bce, row.gap_to_bayes = test.get("bayes_bce"), test.get("gap_to_bayes")
    row.samples_per_s = last.get("samples_per_s")
    atomic_write_text(run / "result.json", json.dumps({**asdict(row), "config": asdict(config)}, indent=2) + "\n")
    return row


def _run_quantized(base: TrainConfig, trained: str, scheme: str, ratio: float, seed: int, out: Path) -> SweepRow:
    """The run of ``trained`` (trained first if it is not done), its best checkpoint quantized and tested."""
    source = _run_one(base, trained, ratio, seed, out)
    method = f"{trained}+{scheme}"
    run, source_run = _run_dir(out, method, ratio, seed), _run_dir(out, trained, ratio, seed)
    name, options = parse_method_spec(trained)
    config = replace(
        base,
        method=name,
        compression=None if ratio == 1 else ratio,
        seed=seed,
        out=str(source_run),
        method_options={**base.method_options, **options},
    )
    saved_config = json.loads(json.dumps(asdict(config)))
    if (run / "result.json").exists():
        saved = json.loads((run / "result.json").read_text())
        if _same_settings(saved.pop("config", {}), config):
            return SweepRow(**saved)
    row = SweepRow(method, ratio, seed, note=source.note)
    if source.test_bce is not None:  # the method could be built and trained: quantize what it learnt
        trainer = Trainer(config)
        trainer.load(source_run / "checkpoints" / "best")
        trainer.model = quantize(trainer.model, scheme)
        test = trainer.evaluate("test")
        memory = trainer.model.embeddings.memory()
        full = sum(full_table_bytes(f.num_embeddings, config.embedding_dim) for f in trainer.model.embeddings.features)
        row.ratio_reached, row.params = full / memory.total, memory.total // 4
        row.val_bce = trainer.evaluate(config.eval_split)["bce"]
        row.test_bce, row.test_auc = test["bce"], test["auc"]
        row.bayes_bce, row.gap_to_bayes = test.get("bayes_bce"), test.get("gap_to_bayes")
        row.note = f"{trained} trained, tables {scheme} after training"
    atomic_write_text(run / "result.json", json.dumps({**asdict(row), "config": saved_config}, indent=2) + "\n")
    return row


def write_results(rows: list[SweepRow], out: Path, baseline: str | None = None, test: str = "welch") -> None:
    """``results.csv``, ``results.md`` (means over seeds), ``comparison.md`` (against ``baseline``, default: see
    :func:`~compemb.bench.verdicts.default_baseline`) and the two plots."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: value for key, value in asdict(row).items() if key in COLUMNS})
    atomic_write_text(out / "results.csv", buffer.getvalue())
    atomic_write_text(out / "results.md", markdown_table(rows) + "\n")
    if rows:
        baseline = baseline or default_baseline([r.method for r in rows])
        atomic_write_text(out / "comparison.md", comparison_table(rows, baseline, test) + "\n")
    _plot(rows, "test_bce", "test BCE", out / "bce.png")
    _plot(rows, "test_auc", "test AUC", out / "auc.png")
    if any(not _compresses(r.method) and r.val_bce is not None for r in rows):
        atomic_write_text(out / "match.md", match_table(rows) + "\n")
        _plot_params(rows, out / "bce_params.png")


def _full_val_bce(rows: list[SweepRow]) -> float | None:
    return _mean([r.val_bce for r in rows if not _compresses(r.method)])


def params_to_match(rows: list[SweepRow], target: float) -> float | None:
    """The fewest params at which a method's mean val BCE reaches ``target``, interpolated in log(params).

    ``rows`` are one method's; None when no tried size reaches it.
    """
    means = [(_mean([r.params for r in g]), _mean([r.val_bce for r in g])) for g in _grouped(rows).values()]
    points = sorted((p, b) for p, b in means if p is not None and b is not None)
    for index, (params, bce_value) in enumerate(points):
        if bce_value <= target:
            if index == 0:
                return params
            smaller, above = points[index - 1]
            share = (above - target) / (above - bce_value)  # the crossing, between the two sizes tried
            return math.exp(math.log(smaller) + share * (math.log(params) - math.log(smaller)))
    return None


def match_table(rows: list[SweepRow]) -> str:
    """Per method: the fewest params that match the full table's val BCE, as a share of the full table's."""
    target = _full_val_bce(rows)
    full_params = _mean([r.params for r in rows if not _compresses(r.method)])
    # write_results makes this table only where a full table was trained (its val BCE and params are known)
    assert target is not None and full_params is not None
    lines = [
        f"Full table: val BCE {target:.4f} with {full_params:,.0f} params (bytes / 4).",
        "",
        "| method | params to match the full table | x full table | best val BCE (params) |",
        "|---|---:|---:|---:|",
    ]
    by_method: dict[str, list[SweepRow]] = {}
    for row in rows:
        if _compresses(row.method):
            by_method.setdefault(row.method, []).append(row)
    found = []
    for method, method_rows in by_method.items():
        needed = params_to_match(method_rows, target)
        tried = [(r.val_bce, r.params) for r in method_rows if r.val_bce is not None]
        best = min(tried) if tried else None
        best_text = f"{best[0]:.4f} ({best[1]:,})" if best else "—"
        found.append((needed if needed is not None else math.inf, method, best_text))
    for needed, method, best_text in sorted(found):
        if math.isinf(needed):
            lines.append(f"| {method} | not reached at the sizes tried | — | {best_text} |")
        else:
            lines.append(f"| {method} | {needed:,.0f} | {needed / full_params:.3f} | {best_text} |")
    return "\n".join(lines)


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _grouped(rows: list[SweepRow]) -> dict[tuple[str, float], list[SweepRow]]:
    groups: dict[tuple[str, float], list[SweepRow]] = {}
    for row in rows:
        groups.setdefault((row.method, row.ratio_asked), []).append(row)
    return groups


def _spread(values: list[Any]) -> float | None:
    """The sample standard deviation over seeds (None with fewer than two)."""
    present = [v for v in values if v is not None]
    return statistics.stdev(present) if len(present) > 1 else None


def markdown_table(rows: list[SweepRow]) -> str:
    """The sweep as a markdown table, one line per (method, ratio asked): means over seeds, ± their sd."""
    lines = [
        "| method | ratio asked | ratio reached | params | seeds | val BCE | test BCE | test AUC | Bayes BCE | "
        "gap to Bayes | samples/s | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cell(value: float | None, spec: str, spread: float | None = None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        return format(value, spec) + ("" if spread is None else f" ± {format(spread, spec.lstrip('+'))}")

    for (method, ratio), group in _grouped(rows).items():
        mean = {key: _mean([getattr(r, key) for r in group]) for key in COLUMNS[2:-1] if key != "seed"}
        sd = {key: _spread([getattr(r, key) for r in group]) for key in ("val_bce", "test_bce", "test_auc")}
        seeds = sum(r.test_bce is not None for r in group)
        note = group[0].note.split(";")[0][:80]
        lines.append(
            f"| {method} | {ratio:g} | {cell(mean['ratio_reached'], '.1f')} | {cell(mean['params'], ',.0f')} | "
            f"{seeds} | {cell(mean['val_bce'], '.4f', sd['val_bce'])} | {cell(mean['test_bce'], '.4f', sd['test_bce'])} | "
            f"{cell(mean['test_auc'], '.4f', sd['test_auc'])} | {cell(mean['bayes_bce'], '.4f')} | "
            f"{cell(mean['gap_to_bayes'], '+.1%')} | {cell(mean['samples_per_s'], ',.0f')} | {note} |"
        )
    return "\n".join(lines)


def _chart(rows: list[SweepRow], key: str, label: str, x: str = "ratio_reached") -> Chart:
    """What a plot of ``key`` shows: per compressing method and ratio asked, the mean over seeds and its sd at the
    mean ``x``; the full table's mean and (for test BCE) the Bayes limit as references; why a method has none."""
    series: dict[str, list[Point]] = {}
    notes: dict[str, str] = {}
    for (method, _), group in _grouped(rows).items():
        if not _compresses(method):
            continue
        points = series.setdefault(method, [])
        values = [v for v in (getattr(r, key) for r in group) if v is not None and not math.isnan(v)]
        where = _mean([getattr(r, x) for r in group])
        if values and where is not None:
            points.append(Point(where, statistics.fmean(values), _spread(values) or 0.0, len(values)))
        else:
            notes.setdefault(method, group[0].note.split(";")[0][:70] or "no value")
    references = {"full table": _mean([getattr(r, key) for r in rows if not _compresses(r.method)])}
    if key == "test_bce":
        references["Bayes-optimal"] = _mean([r.bayes_bce for r in rows])
    return Chart(
        label,
        key == "test_auc",
        series,
        {name: v for name, v in references.items() if v is not None},
        {method: why for method, why in notes.items() if not series[method]},
        "ratio" if x == "ratio_reached" else "params",
    )


def _figure(rows: list[SweepRow], key: str, label: str, x: str = "ratio_reached") -> Figure:
    """The plot of ``key`` against ``x`` (see :func:`compemb.bench.sweep_plot.draw` for which chart)."""
    return draw(_chart(rows, key, label, x))


def _plot(rows: list[SweepRow], key: str, label: str, path: Path) -> None:
    save_png(_figure(rows, key, label), path)


def _plot_params(rows: list[SweepRow], path: Path) -> None:
    save_png(_figure(rows, "val_bce", "validation BCE", x="params"), path)
