"""The sweep's plots, read from the matplotlib objects: a one-ratio sweep ranked best first with its seed spread and
labelled references; several ratios as lines a reader tells apart, with the legend outside the axes."""

import statistics

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from compemb.bench.quality import SweepRow, _figure, _plot
from compemb.registry import METHODS

BAYES = 0.37


def _rows(method, ratio, values, reached=None, aucs=None):
    return [
        SweepRow(
            method,
            ratio,
            seed,
            ratio_reached=reached or ratio,
            params=int(1e6 / (reached or ratio)),
            val_bce=value,
            test_bce=value,
            test_auc=(aucs or [0.8] * len(values))[seed],
            bayes_bce=BAYES,
        )
        for seed, value in enumerate(values)
    ]


# one ratio: full at 1x (a reference), five methods at 100x, full+int8 (asked 1x, reaches 2.67x), one refused
ONE_RATIO = {
    "hash": [0.431, 0.433, 0.429],
    "ce": [0.425, 0.428, 0.426],
    "qr": [0.440, 0.436, 0.438],
    "robe": [0.421, 0.424, 0.423],
    "tt": [0.69, 0.69, 0.69],
}


def _one_ratio_rows():
    rows = _rows("full", 1.0, [0.418, 0.420, 0.419])
    for index, (method, values) in enumerate(ONE_RATIO.items()):
        rows += _rows(method, 100.0, values, aucs=[0.8 - 0.01 * index + 0.001 * s for s in range(3)])
    rows += _rows("full+int8", 1.0, [0.427, 0.427, 0.428], reached=2.67)
    rows += [SweepRow("cce", 100.0, seed, note="cce cannot meet 100x: at most 31.5x") for seed in range(3)]
    return rows


def _error_bars(axes):
    """(x data, y data, error bar segments) of each errorbar call: a ranked row, or a method's line."""
    found = []
    for container in axes.containers:
        line, _, (bars,) = container.lines
        found.append((line.get_xdata(), line.get_ydata(), bars.get_segments()))
    return found


def test_a_one_ratio_sweep_is_ranked_best_first_with_names_spread_and_references():
    figure = _figure(_one_ratio_rows(), "test_bce", "test BCE")
    axes = figure.axes[0]
    seeds = ONE_RATIO | {"full+int8": [0.427, 0.427, 0.428]}
    means = {method: statistics.fmean(values) for method, values in seeds.items()}
    ranked = sorted(means, key=means.get)
    labels = [label.get_text() for label in axes.get_yticklabels()]
    # every method named on its own row, best on top; one not at the sweep's ratio says where; the refused last
    assert labels == [m if m != "full+int8" else "full+int8 (2.67x)" for m in ranked] + ["cce"]
    assert axes.get_ylim()[0] > axes.get_ylim()[1]  # row 0 (the best) at the top
    bars = _error_bars(axes)
    assert [xs[0] for xs, _, _ in bars] == pytest.approx(sorted(means.values()))
    assert [ys[0] for _, ys, _ in bars] == list(range(len(ranked)))
    for method, (_, _, (segment,)) in zip(ranked, bars):
        sd = statistics.stdev(seeds[method])
        assert segment[:, 0] == pytest.approx([means[method] - sd, means[method] + sd])
    # the axis fits the methods: tt (0.69) is off it, marked at the edge; the full table drawn where it is; the
    # Bayes limit too far to draw without squashing them, and the legend says so
    low, high = axes.get_xlim()
    assert low < min(means.values()) - statistics.stdev(ONE_RATIO["robe"]) and high < 0.69
    assert any(line.get_label() == "off the axis" and line.get_xdata()[0] == high for line in axes.lines)
    full = [line.get_xdata()[0] for line in axes.lines if line.get_label() == "full table"]
    assert full == pytest.approx([0.419]) and not [line for line in axes.lines if line.get_label() == "Bayes-optimal"]
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "full table 0.4190" in legend and "Bayes-optimal 0.3700: left of the axis, not drawn" in legend
    assert "error bars ±1 sample sd over seeds" in axes.get_xlabel() and "lower is better" in axes.get_xlabel()


def test_auc_ranks_highest_first_and_draws_no_bayes_line():
    figure = _figure(_one_ratio_rows(), "test_auc", "test AUC")
    axes = figure.axes[0]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    # AUCs 0.801, 0.791, ... in ONE_RATIO's order (hash best); full+int8 and the refused cce have 0.8 and none
    assert labels == ["hash", "full+int8 (2.67x)", "ce", "qr", "robe", "tt", "cce"]
    means = [xs[0] for xs, _, _ in _error_bars(axes)]
    assert means == sorted(means, reverse=True) and "higher is better" in axes.get_xlabel()
    assert not any("Bayes" in text.get_text() for text in figure.legends[0].get_texts())


def test_a_reference_near_the_methods_is_drawn_where_it_lies():
    rows = _rows("hash", 100.0, [0.40, 0.41, 0.42]) + _rows("ce", 100.0, [0.39, 0.40, 0.41])
    rows = [SweepRow(**{**r.__dict__, "bayes_bce": 0.385}) for r in rows]
    axes = _figure(rows, "test_bce", "test BCE").axes[0]
    bayes = [line.get_xdata()[0] for line in axes.lines if line.get_label() == "Bayes-optimal"]
    assert bayes == pytest.approx([0.385]) and axes.get_xlim()[0] < 0.385


# 25 method specs: the registered compressing methods, then post-training quantized ones
NAMES = ([m for m in METHODS if m != "full"] + [f"{m}+int8" for m in ("hash", "ce", "qr", "robe", "tt")])[:25]


def _many_ratio_rows(methods=25):
    rows = _rows("full", 1.0, [0.418, 0.420, 0.419])
    for index in range(methods):
        for ratio in (10.0, 1000.0):
            rows += _rows(NAMES[index], ratio, [0.42 + 0.001 * index * (ratio == 1000) + 0.002 * s for s in range(3)])
    return rows


def test_several_ratios_give_every_method_its_own_colour_and_marker_and_the_legend_sits_outside():
    figure = _figure(_many_ratio_rows(), "test_bce", "test BCE")
    axes = figure.axes[0]
    styles = [(to_rgba(c.lines[0].get_color()), c.lines[0].get_marker()) for c in axes.containers]
    assert len(styles) == 25 and len(set(styles)) == 25
    assert axes.get_xscale() == "log"
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    (legend,) = figure.legends
    assert legend.get_window_extent(renderer).x0 >= axes.get_window_extent(renderer).x1
    # the legend ranks them best first at the highest ratio: NAMES[0] has the lowest BCE at 1000x
    entries = [text.get_text() for text in legend.get_texts()]
    assert len(NAMES) == 25 and entries[:25] == NAMES and "1,000x" in legend.get_title().get_text()
    assert "full table 0.4190" in entries
    # a line per method through its means, its error bars the seeds' sd
    xs, ys, (first, second) = _error_bars(axes)[3]
    assert list(xs) == [10.0, 1000.0] and ys == pytest.approx([0.422, 0.425])
    assert first[:, 1] == pytest.approx([0.422 - 0.002, 0.422 + 0.002])
    full = [line.get_ydata()[0] for line in axes.lines if line.get_label() == "full table"]
    assert full == pytest.approx([0.419])


def test_a_method_keeps_its_colour_across_the_sweeps_plots():
    rows = _many_ratio_rows(methods=4)
    for row in rows:
        row.test_auc = 0.9 - row.test_bce if row.method != NAMES[0] else 0.1  # best BCE, worst AUC
    bce, auc = (_figure(rows, key, key).axes[0] for key in ("test_bce", "test_auc"))
    colours = [[c.lines[0].get_color() for c in axes.containers] for axes in (bce, auc)]
    assert colours[0] == colours[1]


def test_plot_writes_a_png(tmp_path):
    _plot(_one_ratio_rows(), "test_bce", "test BCE", tmp_path / "bce.png")
    _plot([], "test_bce", "test BCE", tmp_path / "empty.png")  # nothing ran: a figure that says so, no error
    assert (tmp_path / "bce.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "empty.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bce.png", "empty.png"]  # no temporary file left
