"""Fault injection through the I/O seam: every injected fault surfaces as a reported failure."""

from __future__ import annotations

import pytest
import torch

from kvtier import ChunkKey, KVLayout, StoreConfig, TieredStore
from kvtier._faults import READ_FAULTS, WRITE_FAULTS, FaultyIO
from kvtier.errors import TransferError


def _store(layout: KVLayout, tmp_path, io: FaultyIO, host: int = 2) -> TieredStore:
    cfg = StoreConfig(
        gpu_bytes=layout.chunk_bytes * 2,
        host_bytes=host * layout.chunk_bytes,
        disk_bytes=32 * (layout.chunk_bytes + 8192),
        disk_dir=tmp_path,
        device="cpu",
        io_threads=2,
    )
    return TieredStore(layout, cfg, io=io)


@pytest.mark.parametrize("fault", READ_FAULTS)
@pytest.mark.parametrize("layout_name", ["tiny_layout", "page_layout"])
def test_read_fault_is_a_reported_miss(fault, layout_name, request, tmp_path, make_chunk) -> None:
    layout = request.getfixturevalue(layout_name)
    io = FaultyIO(payload_bytes=layout.chunk_bytes, seed=1)
    with _store(layout, tmp_path, io) as store:
        keys = [ChunkKey(0, 0, i) for i in range(4)]
        for i, k in enumerate(keys):
            store.write(k, make_chunk(layout, i))
        assert store.where(keys[0]) == ("disk",)
        io.inject(fault)
        out = torch.empty(1, *layout.chunk_shape, dtype=layout.dtype)
        assert store.read([keys[0]], out) == [keys[0]]
        io.inject(fault)
        handle = store.prefetch([keys[1], keys[2]], to="host")
        assert handle.wait(timeout=30) == [keys[1]]
        assert store.stats()["disk"]["failures"] == 2 == sum(io.injected.values())
        corrupt = fault == "bitflip_read"  # a checksum failure discards the copy; I/O errors keep it
        assert store.contains(keys[0]) is not corrupt and store.contains(keys[1]) is not corrupt
        if not corrupt:
            assert store.read([keys[0]], out) == []
            assert torch.equal(out[0].view(torch.uint8), make_chunk(layout, 0).view(torch.uint8))


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_write_fault_raises_and_changes_nothing(fault, tiny_layout, tmp_path, make_chunk) -> None:
    io = FaultyIO(payload_bytes=tiny_layout.chunk_bytes)
    with _store(tiny_layout, tmp_path, io) as store:
        store.write((0, 0, 0), make_chunk(tiny_layout, 0))
        store.write((0, 0, 1), make_chunk(tiny_layout, 1))
        io.inject(fault)
        with pytest.raises(TransferError, match=r"disk write of \(0, 0, 0\)"):
            store.write((0, 0, 1), make_chunk(tiny_layout, 99))  # needs a spill of (0, 0, 0)
        assert store.where((0, 0, 0)) == ("host",) and store.stats()["disk"]["used_bytes"] == 0
        out = torch.empty(2, *tiny_layout.chunk_shape, dtype=tiny_layout.dtype)
        assert store.read([(0, 0, 0), (0, 0, 1)], out) == []
        assert torch.equal(out[1].view(torch.uint8), make_chunk(tiny_layout, 1).view(torch.uint8))
        store.write((0, 0, 1), make_chunk(tiny_layout, 99))  # the disk works again
        assert store.where((0, 0, 0)) == ("disk",)
        assert io.injected[fault] == 1 and store.stats()["disk"]["failures"] == 1


def test_random_faults_are_all_accounted_for(tiny_layout, tmp_path, make_chunk) -> None:
    rates = {f: 0.08 for f in READ_FAULTS + WRITE_FAULTS}
    io = FaultyIO(payload_bytes=tiny_layout.chunk_bytes, rates=rates, seed=7)
    failures_seen = 0
    with _store(tiny_layout, tmp_path, io, host=3) as store:
        expected: dict[ChunkKey, torch.Tensor] = {}
        for i in range(60):
            k = ChunkKey(0, i % 2, i % 10)
            try:
                store.write(k, make_chunk(tiny_layout, i))
                expected[k] = make_chunk(tiny_layout, i)
            except TransferError:
                failures_seen += 1
            keys = [k for k in expected if store.contains(k)]
            out = torch.empty(len(keys), *tiny_layout.chunk_shape, dtype=tiny_layout.dtype)
            missed = set(store.read(keys, out))
            for j, key in enumerate(keys):
                if key not in missed:
                    assert torch.equal(out[j].view(torch.uint8), expected[key].view(torch.uint8))
        io.enabled = False
        assert sum(io.injected.values()) > 5
        assert store.stats()["disk"]["failures"] == sum(io.injected.values())
    assert failures_seen == sum(io.injected[f] for f in WRITE_FAULTS)


def test_fault_seam_rejects_unknown_faults() -> None:
    with pytest.raises(ValueError, match="fault: expected one of"):
        FaultyIO().inject("gamma_ray")
    with pytest.raises(ValueError, match="rates: expected faults from"):
        FaultyIO(rates={"gamma_ray": 1.0})
