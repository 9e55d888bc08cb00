"""Disk tier crash consistency: damaged slots are misses after reopen, the rest is intact."""

from __future__ import annotations

import os

import pytest
import torch

from kvtier import ChunkKey, KVLayout, StoreConfig, TieredStore
from kvtier._faults import FaultyIO, flip_bit_on_disk, truncate_file
from kvtier.errors import TransferError
from kvtier.tiers import PAGE_BYTES, DiskTier
from kvtier.tiers.disk import FILE_TARGET_BYTES

KEYS = [ChunkKey(1, i % 2, i) for i in range(6)]


def _config(layout: KVLayout, tmp_path) -> StoreConfig:
    return StoreConfig(
        gpu_bytes=0,
        host_bytes=layout.chunk_bytes,
        disk_bytes=16 * (layout.chunk_bytes + 8192),
        disk_dir=tmp_path,
        device="cpu",
        io_threads=1,
    )


def _fill(layout: KVLayout, tmp_path, make_chunk, io=None) -> dict[ChunkKey, torch.Tensor]:
    data = {k: make_chunk(layout, i) for i, k in enumerate(KEYS)}
    with TieredStore(layout, _config(layout, tmp_path), io=io) as store:
        for k, c in data.items():
            store.write(k, c)
    return data


def _slot_of(layout: KVLayout, tmp_path, key: ChunkKey) -> tuple[DiskTier, int]:
    disk = DiskTier(layout, _config(layout, tmp_path).disk_bytes, tmp_path)  # type: ignore[arg-type]
    slot = {r.key: r.slot for r in disk.scan()}[key]
    return disk, slot


def _check_after_reopen(layout, tmp_path, data, bad: set[ChunkKey]) -> None:
    with TieredStore(layout, _config(layout, tmp_path)) as store:
        out = torch.empty(len(KEYS), *layout.chunk_shape, dtype=layout.dtype)
        missed = store.read(KEYS, out)
        assert set(missed) == bad
        for i, k in enumerate(KEYS):
            if k not in bad:
                assert torch.equal(out[i].view(torch.uint8), data[k].view(torch.uint8))
        for k in bad:  # a corrupt copy is discarded, not retried forever
            assert not store.contains(k)


@pytest.mark.parametrize("layout_name", ["tiny_layout", "page_layout"])
@pytest.mark.parametrize("where", ["payload", "header"])
def test_bit_flip_at_rest_is_a_miss(layout_name, where, request, tmp_path, make_chunk) -> None:
    layout = request.getfixturevalue(layout_name)
    data = _fill(layout, tmp_path, make_chunk)
    disk, slot = _slot_of(layout, tmp_path, KEYS[2])
    path, offset = disk.locate(slot)
    disk.close()
    flip_bit_on_disk(
        path, offset + (layout.chunk_bytes // 2 if where == "payload" else disk.payload_span + 40), 3
    )
    _check_after_reopen(layout, tmp_path, data, {KEYS[2]})


def test_torn_slot_payload_rewritten_without_header_is_a_miss(tiny_layout, tmp_path, make_chunk) -> None:
    data = _fill(tiny_layout, tmp_path, make_chunk)
    disk, slot = _slot_of(tiny_layout, tmp_path, KEYS[4])
    path, offset = disk.locate(slot)
    disk.close()
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"\x55" * (tiny_layout.chunk_bytes // 2), offset)  # a newer payload, torn, no header yet
    os.close(fd)
    _check_after_reopen(tiny_layout, tmp_path, data, {KEYS[4]})


def test_truncated_file_loses_only_the_cut_slots(tiny_layout, tmp_path, make_chunk) -> None:
    data = _fill(tiny_layout, tmp_path, make_chunk)
    disk, _ = _slot_of(tiny_layout, tmp_path, KEYS[0])
    by_slot = sorted((r.slot, r.key) for r in disk.scan())
    path, offset = disk.locate(by_slot[-2][0])
    disk.close()
    truncate_file(path, offset + disk.slot_bytes // 2)
    cut = {by_slot[-2][1], by_slot[-1][1]}
    _check_after_reopen(tiny_layout, tmp_path, data, cut)
    assert FILE_TARGET_BYTES // disk.slot_bytes > len(KEYS)  # all slots share one file here


def test_stale_generation_never_wins(tiny_layout, tmp_path, make_chunk) -> None:
    """A crash between writing a new copy and clearing the old one leaves two headers of
    one key: the newer generation is served, the older slot is reclaimed."""
    cap = 8 * 8192
    disk = DiskTier(tiny_layout, cap, tmp_path)
    key = ChunkKey(3, 0, 0)
    old, new = disk.allocate(), disk.allocate()
    disk.write(old, key, make_chunk(tiny_layout, 1).view(-1).view(torch.uint8))
    gen_new = disk.write(new, key, make_chunk(tiny_layout, 2).view(-1).view(torch.uint8))
    disk.close()  # old never freed: as if the process died here
    reopened = DiskTier(tiny_layout, cap, tmp_path)
    assert [(r.key, r.slot, r.generation) for r in reopened.scan()] == [(key, new, gen_new)]
    assert reopened.num_free == reopened.num_slots - 1
    reopened.close()
    with TieredStore(
        tiny_layout,
        StoreConfig(gpu_bytes=0, host_bytes=1024, disk_bytes=cap, disk_dir=tmp_path, device="cpu"),
    ) as store:
        out = torch.empty(1, *tiny_layout.chunk_shape, dtype=tiny_layout.dtype)
        assert store.read([key], out) == []
        assert torch.equal(out[0].view(torch.uint8), make_chunk(tiny_layout, 2).view(torch.uint8))


def test_writer_killed_mid_slot_leaves_no_data(tiny_layout, tmp_path, make_chunk) -> None:
    io = FaultyIO(payload_bytes=tiny_layout.chunk_bytes)
    cfg = _config(tiny_layout, tmp_path)
    store = TieredStore(tiny_layout, cfg, io=io)
    store.write(KEYS[0], make_chunk(tiny_layout, 0))
    io.inject("torn_write")
    with pytest.raises(TransferError, match="torn write"):
        store.write(KEYS[1], make_chunk(tiny_layout, 1))  # spilling KEYS[0] dies half way
    assert store.where(KEYS[0]) == ("host",)  # the victim stayed, nothing was lost
    # Simulate the process dying now: no close(), so no flush; reopen sees the torn slot.
    store._abandon()
    with TieredStore(tiny_layout, cfg) as reopened:
        assert len(reopened) == 0
        assert reopened.stats()["disk"]["used_bytes"] == 0
    assert io.injected["torn_write"] == 1 and PAGE_BYTES == 4096
