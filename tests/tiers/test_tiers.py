"""Each tier alone: bytes in, the same bytes out; slots; budgets; bad inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from kvtier.errors import CapacityError, ConfigError, CorruptChunkError, LayoutMismatchError
from kvtier.layout import KVLayout
from kvtier.tiers import PAGE_BYTES, ChunkKey, DeviceTier, DiskTier, HostTier, PosixIO, SlotAllocator
from kvtier.tiers.base import aligned_empty


def test_slot_allocator_lowest_first_and_no_double_free() -> None:
    alloc = SlotAllocator(3)
    assert [alloc.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CapacityError, match="expected a free slot"):
        alloc.allocate()
    alloc.free(1)
    with pytest.raises(ValueError, match="expected an allocated slot"):
        alloc.free(1)
    assert alloc.allocate() == 1


def test_aligned_empty_is_page_aligned() -> None:
    t, pinned = aligned_empty(10_000, pin=False)
    assert t.numel() == 10_000 and t.data_ptr() % PAGE_BYTES == 0 and not pinned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_memory_tiers_round_trip_bit_exact(dtype: torch.dtype, make_chunk) -> None:
    layout = KVLayout(num_layers=1, num_kv_heads=3, head_dim=8, dtype=dtype, chunk_size=5, group_size=5)
    for tier in (DeviceTier(layout, 4 * layout.chunk_bytes, "cpu"), HostTier(layout, 4 * layout.chunk_bytes)):
        assert tuple(tier.slab.shape) == (4, *layout.chunk_shape)
        assert tier.capacity_bytes == 4 * layout.chunk_bytes
        slots = [tier.allocate() for _ in range(4)]
        chunks = [make_chunk(layout, s) for s in slots]
        for s, c in zip(slots, chunks):
            tier.write(s, c)
        for s, c in zip(slots, chunks):
            out = torch.empty_like(c)
            tier.read_into(s, out)
            assert torch.equal(out.view(torch.uint8), c.view(torch.uint8))


def test_host_tier_pageable_fallback_is_logged(
    tiny_layout: KVLayout, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("pinning works here; the fallback is for CPU-only torch")
    with caplog.at_level(logging.INFO, logger="kvtier.tiers"):
        tier = HostTier(tiny_layout, 1024)
    assert not tier.pinned
    assert "pageable memory" in caplog.text
    assert tier.slab.data_ptr() % PAGE_BYTES == 0


def test_memory_tier_bad_inputs(tiny_layout: KVLayout, make_chunk) -> None:
    tier = HostTier(tiny_layout, 2 * tiny_layout.chunk_bytes)
    slot = tier.allocate()
    good = make_chunk(tiny_layout, 0)
    with pytest.raises(TypeError, match="expected dtype"):
        tier.write(slot, good.float())
    with pytest.raises(ValueError, match=r"expected shape \[2, 1, 4, 8\]"):
        tier.write(slot, good[:, :, :2])
    with pytest.raises(ValueError, match="expected a contiguous tensor"):
        tier.write(slot, good.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="expected an allocated slot id"):
        tier.write(1, good)
    with pytest.raises(ConfigError, match="expected a budget of at least one slot"):
        DeviceTier(tiny_layout, tiny_layout.chunk_bytes - 1, "cpu")


@pytest.mark.parametrize("layout_name", ["tiny_layout", "page_layout"])
def test_disk_round_trip_and_reopen(
    layout_name: str, request: pytest.FixtureRequest, tmp_path, make_chunk
) -> None:
    layout: KVLayout = request.getfixturevalue(layout_name)
    disk = DiskTier(layout, 10 * (layout.chunk_bytes + 2 * PAGE_BYTES), tmp_path)
    assert disk.slot_bytes % PAGE_BYTES == 0
    written = {}
    for i in range(5):
        key = ChunkKey(7, i % 2, i)
        slot = disk.allocate()
        chunk = make_chunk(layout, i)
        written[key] = (slot, disk.write(slot, key, chunk.view(-1).view(torch.uint8)), chunk)
    # Both read paths: a page-aligned destination (zero copy when chunk_bytes is a 4 KiB
    # multiple) and an unaligned one (bounce buffer).
    aligned, _ = aligned_empty(layout.chunk_bytes + 64, pin=False)
    for key, (slot, gen, chunk) in written.items():
        for out in (aligned[: layout.chunk_bytes], aligned[64:]):
            disk.read_into(slot, key, gen, out)
            assert torch.equal(out, chunk.view(-1).view(torch.uint8))
    assert isinstance(disk.direct_reason, str) and disk.direct_reason
    disk.close()
    reopened = DiskTier(layout, 10 * (layout.chunk_bytes + 2 * PAGE_BYTES), tmp_path)
    found = {r.key: (r.slot, r.generation) for r in reopened.scan()}
    assert found == {k: (s, g) for k, (s, g, _) in written.items()}
    reopened.close()


def test_disk_wrong_key_or_generation_is_corrupt(tiny_layout: KVLayout, tmp_path, make_chunk) -> None:
    disk = DiskTier(tiny_layout, 4 * 8192, tmp_path)
    slot = disk.allocate()
    key = ChunkKey(1, 0, 0)
    gen = disk.write(slot, key, make_chunk(tiny_layout, 1).view(-1).view(torch.uint8))
    out = torch.empty(tiny_layout.chunk_bytes, dtype=torch.uint8)
    with pytest.raises(CorruptChunkError, match="generation"):
        disk.read_into(slot, key, gen + 1, out)
    with pytest.raises(CorruptChunkError, match=r"expected \(1, 0, 1\)"):
        disk.read_into(slot, ChunkKey(1, 0, 1), gen, out)
    disk.close()


def test_disk_layout_mismatch_on_reopen(tiny_layout: KVLayout, tmp_path, make_chunk) -> None:
    disk = DiskTier(tiny_layout, 4 * 8192, tmp_path)
    slot = disk.allocate()
    disk.write(slot, ChunkKey(1, 0, 0), make_chunk(tiny_layout, 1).view(-1).view(torch.uint8))
    disk.close()
    other = KVLayout(
        num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, chunk_size=4, group_size=2
    )
    with pytest.raises(LayoutMismatchError, match="expected layout fingerprint"):
        DiskTier(other, 4 * 8192, tmp_path)


def test_disk_budget_and_payload_checks(tiny_layout: KVLayout, tmp_path) -> None:
    with pytest.raises(ConfigError, match="expected at least one disk slot"):
        DiskTier(tiny_layout, 4096, tmp_path)
    disk = DiskTier(tiny_layout, 2 * 8192, tmp_path)
    assert disk.num_slots == 2 and disk.capacity_bytes == 2 * 8192
    with pytest.raises(ValueError, match="expected \\[128\\] uint8 on cpu"):
        disk.write(disk.allocate(), ChunkKey(0, 0, 0), torch.zeros(64, dtype=torch.uint8))
    disk.close()


def test_posix_reader_reports_o_direct(tiny_layout: KVLayout, tmp_path, make_chunk) -> None:
    disk = DiskTier(tiny_layout, 2 * 8192, tmp_path, io=PosixIO(direct=False))
    slot = disk.allocate()
    gen = disk.write(slot, ChunkKey(0, 0, 0), make_chunk(tiny_layout, 3).view(-1).view(torch.uint8))
    disk.read_into(slot, ChunkKey(0, 0, 0), gen, torch.empty(tiny_layout.chunk_bytes, dtype=torch.uint8))
    assert disk.direct is False and disk.direct_reason == "O_DIRECT not requested"
    disk.close()


def _run_setup(layout, tmp_path, make_chunk, io=None):
    disk = DiskTier(layout, 12 * (layout.chunk_bytes + 2 * PAGE_BYTES), tmp_path, io=io)
    reqs = []
    host = HostTier(layout, 8 * layout.chunk_bytes)
    for i in range(6):
        slot, key = disk.allocate(), ChunkKey(0, 0, i)
        gen = disk.write(slot, key, make_chunk(layout, i).view(-1).view(torch.uint8))
        h = host.allocate()
        reqs.append((slot, key, gen, host.payload(h)))
    return disk, host, reqs


def test_read_many_reads_adjacent_slots_in_one_call(page_layout, tmp_path, make_chunk) -> None:
    calls = []

    class CountingIO(PosixIO):
        def open_reader(self, path):
            reader = super().open_reader(path)
            inner = reader.readv

            def readv(buffers, offset):
                calls.append(len(buffers))
                return inner(buffers, offset)

            reader.readv = readv  # type: ignore[method-assign]
            return reader

    disk, _host, reqs = _run_setup(page_layout, tmp_path, make_chunk, CountingIO())
    shuffled = [reqs[i] for i in (3, 0, 5, 1, 4, 2)]
    assert disk.read_many(shuffled) == [None] * 6
    assert calls == [12]  # six slots, payload + header each, one preadv
    for i, (_, _, _, out) in enumerate(reqs):
        assert torch.equal(out, make_chunk(page_layout, i).view(-1).view(torch.uint8))
    disk.close()


def test_read_many_faults_fail_exactly_the_affected_slots(page_layout, tmp_path, make_chunk) -> None:
    from kvtier._faults import FaultyIO
    from kvtier.errors import TransferError

    io = FaultyIO(payload_bytes=page_layout.chunk_bytes)
    disk, _host, reqs = _run_setup(page_layout, tmp_path, make_chunk, io)
    io.inject("read_error")
    assert all(isinstance(e, TransferError) for e in disk.read_many(reqs))  # the whole run failed
    io.inject("short_read")
    errs = disk.read_many(reqs)
    assert errs[:5] == [None] * 5 and isinstance(errs[5], TransferError)  # only the cut slot
    io.inject("bitflip_read")
    errs = disk.read_many(reqs)
    assert (
        isinstance(errs[0], CorruptChunkError) and errs[1:] == [None] * 5
    )  # flip lands in the first payload
    assert io.injected["read_error"] == io.injected["short_read"] == io.injected["bitflip_read"] == 1
    disk.close()
