"""``kvtier bench io`` at a tiny size: runs, verifies its bytes, writes JSON and CSV rows."""

from __future__ import annotations

import csv
import json

import pytest

from kvtier.bench_io import CSV_COLUMNS, _layout
from kvtier.cli import main


def test_bench_io_tiny_run(tmp_path, capsys) -> None:
    out, rows = tmp_path / "io.json", tmp_path / "io.csv"
    argv = [
        "bench",
        "io",
        "--dir",
        str(tmp_path / "d"),
        "--size",
        "4MiB",
        "--chunk-bytes",
        "128KiB",
        "--reps",
        "1",
        "--threads",
        "2",
        "--json",
        str(out),
        "--csv",
        str(rows),
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["baseline_read_GBps"] > 0 and res["kvtier_read_GBps"] > 0
    assert res["read_ratio"] == pytest.approx(res["kvtier_read_GBps"] / res["baseline_read_GBps"])
    assert res["num_chunks"] == 32 and isinstance(res["o_direct"], bool)
    with rows.open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_COLUMNS and {r["impl"] for r in table} >= {
        "raw_odirect_beside_posix",
        "kvtier_posix",
    }
    assert "| raw O_DIRECT reader (baseline) |" in capsys.readouterr().out
    assert list((tmp_path / "d").iterdir()) == []


def test_bench_io_rejects_odd_chunk_sizes() -> None:
    with pytest.raises(ValueError, match="--chunk-bytes: expected a multiple of 4096"):
        _layout(6000)
