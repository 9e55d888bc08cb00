"""kvtier/cli/plots.py: PNGs are written where asked, bad series are rejected, no matplotlib is no plot."""

from __future__ import annotations

import pytest

from kvtier.cli import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_lines_writes_a_png_with_gaps(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = plots.plot_lines(tmp_path / "sub" / "lines.png", {"hga": ([8192, 16384, 32768], [1.0, None, 3.0]),
                                                            "sdpa": ([8192, 32768], [2.0, 8.0])},
                            "context (tokens)", "time (ms)", "decode", logx=True, logy=True,
                            xticks=[(8192, "8K"), (32768, "32K")])
    assert path == tmp_path / "sub" / "lines.png"
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_plot_bars_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = plots.plot_bars(tmp_path / "bars.png", {"2K": {"hga": 0.1, "quest": 0.3}, "8K": {"hga": 0.2, "quest": None}},
                           "NLL gap (nats)", "fidelity")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_bars_gives_twelve_bars_twelve_colours(tmp_path, monkeypatch) -> None:
    """Past 10 bars the default colour cycle would repeat: every bar keeps its own colour."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    seen = []
    real_bar = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, *a, **k: seen.append(str(k["color"])) or real_bar(self, *a, **k))
    values = {"4K": {f"rule {i}": 0.01 * i for i in range(12)}}
    assert plots.plot_bars(tmp_path / "many.png", values, "gap", "twelve").read_bytes()[:8] == PNG_MAGIC
    assert len(seen) == 12 and len(set(seen)) == 12


def test_bad_series_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="expected as many y as x values in series 'a', got 1 and 2"):
        plots.plot_lines(tmp_path / "x.png", {"a": ([1, 2], [1.0])}, "x", "y", "t")
    with pytest.raises(ValueError, match="expected at least one series"):
        plots.plot_lines(tmp_path / "x.png", {}, "x", "y", "t")


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(plots, "plot_available", lambda: False)
    assert plots.plot_lines(tmp_path / "x.png", {"a": ([1], [1.0])}, "x", "y", "t") is None
    assert not (tmp_path / "x.png").exists()


def test_the_docs_plots_redraw_from_the_committed_results(tmp_path) -> None:
    """bench/plots.py draws docs/*.png from bench/results/attention.csv and docs/fidelity.json."""
    pytest.importorskip("matplotlib")
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "plots.py"
    assert runpy.run_path(str(script))["main"](tmp_path) == 0
    for name in ("decode_attention", "fidelity_gap", "fidelity_methods", "needles", "decode_cpu"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        assert (script.parents[1] / "docs" / f"{name}.png").exists()  # committed, shown in the README


def test_eval_plot_picks_nll_gaps_or_needles(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from kvtier.cli.eval import plot_eval

    base = {"density": 0.5, "mean_keys_per_query": 1.0, "budget": 1216, "seconds": 1.0, "scored_tokens": 1}
    nll = [dict(base, method=m, length=n, nats_per_token=3.0, gap_vs_dense=g, needle_accuracy=None, depth=None)
           for m, g in (("dense", 0.0), ("hga", 0.01)) for n in (2048, 4096)]
    assert plot_eval(nll, tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    needles = [dict(base, method="hga", length=2048, nats_per_token=None, gap_vs_dense=None, needle_accuracy=1.0,
                    depth=None)]
    assert plot_eval(needles, tmp_path / "b.png").exists()
    assert plot_eval([], tmp_path / "c.png") is None


def test_many_series_get_distinct_colours() -> None:
    """Past the default cycle's 10 colours, lines and bars take tab20's 20 rather than repeating."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    for n in (3, 10, 11, 20):
        colours = plots._colors([f"s{i}" for i in range(n)])
        assert len({to_rgba(c) for c in colours.values()}) == n
