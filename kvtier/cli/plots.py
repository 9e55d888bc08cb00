"""PNG plots written next to a command's CSV/JSON, through the optional ``kvtier[plot]`` extra.

matplotlib stays optional: without it the functions return ``None`` and the command goes on
(its CSV/JSON are the results; a plot is a view of them). Figures are built with
``matplotlib.figure.Figure`` directly, never pyplot, so no GUI backend or global state is touched
and a plot works the same in a headless run, a thread or a test.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["PLOT_HINT", "plot_available", "plot_bars", "plot_lines"]

#: What a command prints when it cannot plot.
PLOT_HINT = "plots skipped: matplotlib is not installed (pip install 'kvtier[plot]')"

#: Series = label -> (x values, y values); None in y leaves a gap (a point that did not run).
Series = Mapping[str, tuple[Sequence[float], Sequence[float | None]]]


def plot_available() -> bool:
    """Whether matplotlib is importable."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure():  # -> matplotlib.figure.Figure
    """A fresh figure of the one size every kvtier plot uses."""
    from matplotlib.figure import Figure

    return Figure(figsize=(7.0, 4.2), dpi=110, layout="constrained")


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _colors(labels: Sequence[str]) -> dict[str, object]:
    """One colour per label: matplotlib's default cycle, or tab20 past its 10 colours (which repeat)."""
    if len(labels) <= 10:
        return {label: f"C{i}" for i, label in enumerate(labels)}
    from matplotlib import colormaps

    return {label: colormaps["tab20"](i % 20) for i, label in enumerate(labels)}


def plot_lines(
    path: str | Path,
    series: Series,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    xticks: Sequence[tuple[float, str]] | None = None,
) -> Path | None:
    """Write a line plot with markers, one line per series.

    Parameters
    ----------
    path : str or Path
        Where the PNG goes (folders are created).
    series : mapping of str to (xs, ys)
        One line per label; ``ys`` may hold ``None`` for a point that did not run (a gap).
    xlabel, ylabel, title : str
        Axis labels and title; put units in the labels.
    logx, logy : bool
        Logarithmic axes (contexts from 8K to 1M want ``logx``).
    xticks : sequence of (value, label), optional
        Tick positions and their labels (e.g. ``[(8192, "8K"), ...]``).

    Returns
    -------
    Path or None
        The written file, or None when matplotlib is not installed.

    Raises
    ------
    ValueError
        When a series' xs and ys differ in length, or no series is given.
    """
    if not series:
        raise ValueError("expected at least one series, got none")
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"expected as many y as x values in series {label!r}, got {len(ys)} and {len(xs)}")
    if not plot_available():
        return None
    colors = _colors(list(series))
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), [float("nan") if y is None else y for y in ys], marker="o", label=label, color=colors[label])
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if xticks:
        ax.set_xticks([v for v, _ in xticks], [t for _, t in xticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if len(series) > 4:  # many lines: the legend goes beside the axes, not over the lines
        fig.set_size_inches(9.5, 4.2)
        fig.legend(loc="outside right upper", fontsize="small")
    else:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_bars(
    path: str | Path,
    values: Mapping[str, Mapping[str, float | None]],
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path | None:
    """Write a grouped bar chart: one group per outer key, one bar per inner key.

    Parameters
    ----------
    path : str or Path
        Where the PNG goes (folders are created).
    values : mapping of group -> (mapping of bar label -> value)
        E.g. ``{"2048 tokens": {"hga": 0.02, "quest": 0.05}}``; None leaves the bar out.
    ylabel, title : str
        Axis label (with units) and title.
    logy : bool
        Logarithmic value axis.

    Returns
    -------
    Path or None
        The written file, or None when matplotlib is not installed.
    """
    if not values:
        raise ValueError("expected at least one group, got none")
    if not plot_available():
        return None
    bars = list(dict.fromkeys(b for group in values.values() for b in group))
    colors = _colors(bars)
    widest = max(sum(v is not None for v in group.values()) for group in values.values())
    width = 0.8 / max(1, widest)
    fig = _figure()
    ax = fig.add_subplot()
    labelled: set[str] = set()
    for g, group in enumerate(values.values()):
        present = [(b, v) for b, v in group.items() if v is not None]
        for i, (bar, value) in enumerate(present):  # centred within its own group
            ax.bar(g + (i - (len(present) - 1) / 2) * width, value, width=width, color=colors[bar],
                   label="_nolegend_" if bar in labelled else bar)
            labelled.add(bar)
    ax.set_xticks(range(len(values)), list(values))
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if len(bars) > 6:  # a long legend goes beside the axes, where it hides no bar
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize="small")
    return _save(fig, path)
