"""The quality sweep's plots, drawn so that a reader sees the winner at a glance.

:func:`draw` picks the chart from the data. Where every method has one point (a sweep at one ratio): a ranked dot
chart, best on top, one row per method named on its axis, its seed spread as error bars and its value beside it.
Otherwise: the metric against the ratio reached, one line per method, each with a colour-marker pair of its own
(kept across the charts of one sweep), the legend outside the axes, best first. Both draw the full table and the
Bayes limit as labelled lines on an axis fitted to the methods; a line too far off to draw without squashing the
methods' differences is named in the legend instead. Figures are made without pyplot: nothing global to close.
"""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compemb.io import atomic_write_bytes
from compemb.outputs import png_metadata

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import LineStyleType

SPREAD = "±1 sample sd over seeds"
# 10 colours against 7 markers (coprime): no two of the first 70 methods share a pair; then the line style changes
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINES = ("-", "--", ":")
# a reference line is drawn where the methods keep at least half of the axis that holds it and them
SQUASH = 2.0
REFERENCE_STYLE: dict[str, tuple[str, LineStyleType]] = {"full table": ("0.3", "--"), "Bayes-optimal": ("black", ":")}
WINNER, OTHERS = "C0", "0.35"


@dataclass(frozen=True)
class Point:
    """One method at one ratio: where it lies on x, the metric's mean over seeds and its sample sd (0 with one)."""

    x: float
    mean: float
    sd: float
    seeds: int


@dataclass
class Chart:
    """What one plot shows: ``metric`` against ``x`` (``"ratio"``, the compression reached, or ``"params"``).
    ``series`` holds each method's points in a fixed order, which fixes its colour and marker; ``references`` the
    full table's and the Bayes-optimal value where known; ``missing`` says why a method has no point."""

    metric: str
    higher_is_better: bool
    series: dict[str, list[Point]]
    references: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    x: str = "ratio"

    def __post_init__(self) -> None:
        if self.x not in X_AXES:
            raise ValueError(f"x {self.x!r}: one of {sorted(X_AXES)}")

    @property
    def x_label(self) -> str:
        return X_AXES[self.x][0]

    def x_text(self, x: float) -> str:
        return X_AXES[self.x][1](x)

    def tick_text(self, x: float) -> str:
        return X_AXES[self.x][2](x)

    def most_compressed(self, xs: list[float]) -> list[float]:
        """``xs`` from the most compressed: the highest ratio, the fewest params."""
        return sorted(xs, reverse=self.x == "ratio")

    def rank_key(self, point: Point) -> float:
        return -point.mean if self.higher_is_better else point.mean

    @property
    def better(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


def _number(x: float) -> str:
    """To 3 significant digits: ``13.8``, ``100`` (for 99.96), ``10,000``."""
    x = float(f"{x:.3g}")
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:g}"


# an x axis: its label, how a value reads in a row's label or the legend, how it reads as a tick
X_AXES: dict[str, tuple[str, Callable[[float], str], Callable[[float], str]]] = {
    "ratio": (
        "compression reached (full table bytes / stored bytes)",
        lambda x: f"{_number(x)}x",
        lambda x: f"{_number(x)}x",
    ),
    "params": ("parameters (stored bytes / 4)", lambda x: f"{_number(x)} params", _number),
}


def x_scale(values: list[float]) -> str:
    """The x axis for these ratios: log where they span 3x or more; linear for a one-ratio sweep (its points lie
    within a few percent of one value, where a log axis stacks unreadable minor tick labels)."""
    return "log" if values and max(values) >= 3 * min(values) else "linear"


def draw(chart: Chart) -> Figure:
    """The ranked chart where no method has more than one point, else the metric against the ratio reached."""
    if all(len(points) <= 1 for points in chart.series.values()):
        return _ranked(chart)
    return _by_ratio(chart)


def save_png(figure: Figure, path: str | os.PathLike) -> None:
    """``figure`` as a PNG at ``path``, written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, metadata=png_metadata())
    atomic_write_bytes(path, buffer.getvalue())


def _fit(lows: list[float], highs: list[float], references: dict[str, float]) -> tuple[float, float, list[str]]:
    """Axis limits that hold the methods' values and every reference close enough not to squash them; the
    references left off."""
    low, high = min(lows), max(highs)
    span = max(high - low, 1e-3 * max(abs(low), abs(high)), 1e-9)
    off = []
    for name, value in sorted(references.items(), key=lambda item: abs(item[1] - (low + high) / 2)):
        if max(high, value) - min(low, value) <= SQUASH * span:
            low, high = min(low, value), max(high, value)
        else:
            off.append(name)
    pad = 0.06 * (high - low)
    return low - pad, high + pad, off


def _references(axes: Axes, chart: Chart, off: list[str], vertical: bool) -> list:
    """Draw the references on the axis; legend handles for all, those off it saying on which side."""
    from matplotlib.lines import Line2D

    low, high = axes.get_xlim() if vertical else axes.get_ylim()
    handles = []
    for name, value in chart.references.items():
        colour, style = REFERENCE_STYLE.get(name, ("0.5", "-."))
        label = f"{name} {value:.4f}"
        if name in off:
            side = ("left of" if vertical else "below") if value < low else ("right of" if vertical else "above")
            label += f": {side} the axis, not drawn"
        elif vertical:
            axes.axvline(value, color=colour, linestyle=style, linewidth=1.2, label=name)
        else:
            axes.axhline(value, color=colour, linestyle=style, linewidth=1.2, label=name)
        handles.append(Line2D([], [], color=colour, linestyle=style, label=label))
    return handles


def _on_axis(points: list[Point]) -> list[bool]:
    """Which of these ranked points the axis holds: all but any far from the rest (more than 5 median absolute
    deviations from the median), whose inclusion would squash the others' differences; never the best."""
    means = [p.mean for p in points]
    middle = statistics.median(means) if means else 0.0
    deviation = statistics.median(abs(m - middle) for m in means) if means else 0.0
    return [row == 0 or deviation == 0 or abs(m - middle) <= 5 * deviation for row, m in enumerate(means)]


def _ranked(chart: Chart) -> Figure:
    """One row per method, best on top: mean over seeds with its sd as error bars, the value on the right."""
    from matplotlib.figure import Figure

    ranked = sorted(((m, p[0]) for m, p in chart.series.items() if p), key=lambda item: chart.rank_key(item[1]))
    missing = [(m, why) for m, why in chart.missing.items() if not chart.series.get(m)]
    rows = len(ranked) + len(missing)
    figure = Figure(figsize=(8.5, 1.9 + 0.3 * max(rows, 3)), layout="constrained")
    axes = figure.add_subplot()
    xs = sorted(p.x for _, p in ranked)
    common = xs[len(xs) // 2] if xs else None
    labels, values = [], []
    for row, (method, point) in enumerate(ranked):
        colour, size = (WINNER, 8) if row == 0 else (OTHERS, 5)
        axes.errorbar(point.mean, row, xerr=point.sd, fmt="o", color=colour, markersize=size, capsize=3, zorder=3)
        aside = common is not None and abs(point.x / common - 1) > 0.1  # not at the sweep's ratio: say where
        labels.append(method + (f" ({chart.x_text(point.x)})" if aside else ""))
        values.append(f"{point.mean:.4f} ± {point.sd:.4f}")
    for row, (method, why) in enumerate(missing, start=len(ranked)):
        labels.append(method)
        values.append("—")
        axes.text(
            0.01,
            row,
            f"no result: {why}",
            va="center",
            fontsize=8,
            color="0.3",
            zorder=4,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            transform=axes.get_yaxis_transform(),
        )
    handles = _ranked_axis(axes, chart, [p for _, p in ranked]) if ranked else []
    if not ranked:
        axes.text(0.5, 0.5, "no method has a result to plot", ha="center", va="center", transform=axes.transAxes)
    axes.set_yticks(range(rows), labels)
    axes.set_ylim(rows - 0.5, -0.5)
    if ranked:
        axes.get_yticklabels()[0].set_fontweight("bold")
    right = axes.secondary_yaxis("right")
    right.set_yticks(range(rows), values)
    right.tick_params(length=0, labelsize=8)
    axes.grid(axis="x", alpha=0.3)
    axes.grid(axis="y", alpha=0.15)
    seeds = sorted({p.seeds for _, p in ranked}) or [0]
    seed_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    axes.set_xlabel(f"{chart.metric} ({chart.better}): mean over {seed_text} seeds, error bars {SPREAD}")
    where = f" at {chart.x_text(common)}" if common is not None else ""
    figure.suptitle(f"{chart.metric}{where}: {rows} methods, best on top", x=0.01, ha="left")
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=1, fontsize=8, frameon=False)
    return figure


def _ranked_axis(axes: Axes, chart: Chart, points: list[Point]) -> list:
    """The metric axis fitted to the ranked points; those off it marked at its edge; the best one's spread and the
    references drawn. The legend's handles."""
    from matplotlib.patches import Patch

    held = _on_axis(points)
    kept = [p for p, on in zip(points, held) if on]
    low, high, off = _fit([p.mean - p.sd for p in kept], [p.mean + p.sd for p in kept], chart.references)
    axes.set_xlim(low, high)
    for row, (point, on) in enumerate(zip(points, held)):
        if not on:  # too far off to draw without squashing the rest: an arrow at the edge, its value on the right
            edge, marker, align = (high, ">", "right") if point.mean > high else (low, "<", "left")
            axes.plot([edge], [row], marker=marker, color=OTHERS, markersize=8, clip_on=False, label="off the axis")
            axes.annotate(
                "off the axis",
                (edge, row),
                xytext=(-10 if align == "right" else 10, 0),
                textcoords="offset points",
                ha=align,
                va="center",
                fontsize=8,
                color="0.3",
            )
    best = points[0]
    axes.axvspan(best.mean - best.sd, best.mean + best.sd, color=WINNER, alpha=0.1, zorder=0)
    handles = [Patch(color=WINNER, alpha=0.2, label="the best one's mean ± 1 sd (tested verdicts: comparison.md)")]
    return handles + _references(axes, chart, off, vertical=True)


def _style(index: int) -> tuple[str, str, str]:
    """The colour, marker and line style of the ``index``-th method: no pair repeats in the first 70."""
    return f"C{index % 10}", MARKERS[index % len(MARKERS)], LINES[index // 10 % len(LINES)]


def _near(points: list[Point], x: float) -> Point | None:
    return next((p for p in points if abs(p.x / x - 1) <= 0.1), None)


def _by_ratio(chart: Chart) -> Figure:
    """The metric against the ratio reached, a line per method with its seed spread; the legend ranks them."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(10, 5.5), layout="constrained")
    axes = figure.add_subplot()
    drawn = {m: sorted(p, key=lambda point: point.x) for m, p in chart.series.items() if p}
    handles = {}
    for index, method in enumerate(chart.series):
        if method in drawn:
            colour, marker, line = _style(index)
            points = drawn[method]
            handles[method] = axes.errorbar(
                [p.x for p in points],
                [p.mean for p in points],
                yerr=[p.sd for p in points],
                color=colour,
                marker=marker,
                linestyle=line,
                capsize=3,
                markersize=6,
                label=method,
            )
    # the legend ranks the methods where most of them ran: the most compressed point half of them or more reached
    everywhere = chart.most_compressed(list({p.x for points in drawn.values() for p in points}))
    target = next(x for x in everywhere if 2 * sum(_near(p, x) is not None for p in drawn.values()) >= len(drawn))

    def rank(method: str) -> tuple[int, float]:
        point = _near(drawn[method], target)
        return (0, chart.rank_key(point)) if point else (1, 0.0)

    order = sorted(drawn, key=rank)
    low, high, off = _fit(
        [p.mean - p.sd for ps in drawn.values() for p in ps],
        [p.mean + p.sd for ps in drawn.values() for p in ps],
        chart.references,
    )
    axes.set_ylim(low, high)
    extra = _references(axes, chart, off, vertical=False)
    extra += [
        Line2D([], [], linestyle="none", label=f"{m}: no result ({why})")
        for m, why in chart.missing.items()
        if m not in drawn
    ]
    _x_axis(axes, chart, everywhere)
    axes.set_ylabel(f"{chart.metric} ({chart.better})")
    axes.set_title(f"{chart.metric} against the {chart.x_label.split(' (')[0]}", loc="left")
    figure.legend(
        handles=[handles[m] for m in order] + extra,
        loc="outside right upper",
        fontsize=8,
        title=f"best first at {chart.x_text(target)}\nerror bars: {SPREAD}",
        title_fontsize=8,
    )
    return figure


def _x_axis(axes: Axes, chart: Chart, xs: list[float]) -> None:
    """Log where ``xs`` span 3x or more (see :func:`x_scale`), ticks in the chart's words (``1,000x``)."""
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation

    class Minor(LogFormatterSciNotation):  # matplotlib's choice of minor ticks to label, written our way
        def __call__(self, x: float, pos: int | None = None) -> str:
            return chart.tick_text(x) if super().__call__(x, pos) else ""

    log = x_scale(xs) == "log"
    if log:
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(Minor(labelOnlyBase=False))
        axes.grid(alpha=0.1, which="minor")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: chart.tick_text(x)))
    axes.grid(alpha=0.3)
    axes.set_xlabel(chart.x_label)
