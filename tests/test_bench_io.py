"""``kvtier bench io`` at a tiny size: runs, verifies its bytes, writes JSON and CSV rows."""

from __future__ import annotations

import csv
import json

import pytest

from kvtier.cli.results import CSV_COLUMNS
from kvtier.cli.bench_io import _layout
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


def test_raw_reader_into_a_slab_lands_every_payload(tmp_path) -> None:
    """The pinned-slab diagnostic reads the same extents, payloads into slab slots."""
    import torch

    from kvtier import StoreConfig, TieredStore
    from kvtier.cli.bench_io import _raw_odirect
    from kvtier.tiers.base import aligned_empty

    layout = _layout(128 * 1024)
    cb = layout.chunk_bytes
    cfg = StoreConfig(gpu_bytes=0, host_bytes=2 * cb, disk_bytes=16 * (cb + 8192), disk_dir=tmp_path)
    with TieredStore(layout, cfg) as store:
        chunks = [torch.full((cb,), i + 1, dtype=torch.uint8) for i in range(6)]
        for i, c in enumerate(chunks):
            store.write((0, 0, i), c.view(layout.dtype).view(layout.chunk_shape))
        store.flush()
        slab = aligned_empty(6 * cb, pin=False)[0].view(6, cb)  # O_DIRECT needs page alignment
        slab.zero_()
        gbps, lat, _ = _raw_odirect(store, 2, into=slab)
        assert gbps > 0 and len(lat) == 6
        # Disk slots were filled lowest first, so extent i holds a chunk of value 1..6.
        assert sorted(int(slab[i, 0]) for i in range(6)) == [1, 2, 3, 4, 5, 6]
        assert all(bool((slab[i] == slab[i, 0]).all()) for i in range(6))
