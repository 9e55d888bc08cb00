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


def test_bad_series_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="expected as many y as x values in series 'a', got 1 and 2"):
        plots.plot_lines(tmp_path / "x.png", {"a": ([1, 2], [1.0])}, "x", "y", "t")
    with pytest.raises(ValueError, match="expected at least one series"):
        plots.plot_lines(tmp_path / "x.png", {}, "x", "y", "t")


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(plots, "plot_available", lambda: False)
    assert plots.plot_lines(tmp_path / "x.png", {"a": ([1], [1.0])}, "x", "y", "t") is None
    assert not (tmp_path / "x.png").exists()
