"""Store durability and safety (issue 10): each numbered case of the issue has a test here
that fails without its fix. Cases about the on-disk format live in tests/tiers/."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

from kvtier import ChunkKey, ConfigError, KVLayout, StoreConfig, TieredStore, TransferError
from kvtier._faults import FaultyIO

LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, chunk_size=16, group_size=8
)
CB = LAYOUT.chunk_bytes


def chunk(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (CB,), dtype=torch.uint8, generator=g).view(LAYOUT.dtype).view(LAYOUT.chunk_shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def config(tmp_path: Path | None, *, host: int = 2, disk: int = 16, gpu: int = 0) -> StoreConfig:
    return StoreConfig(
        gpu_bytes=gpu * CB,
        host_bytes=host * CB,
        disk_bytes=disk * (CB + 4096),
        disk_dir=tmp_path,
        device="cpu",
        io_threads=1,
    )


def read_one(store: TieredStore, key) -> torch.Tensor | None:
    out = torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
    return None if store.read([key], out) else out[0]


# ---------------------------------------------------------------- case 2: failed header clears
@pytest.mark.parametrize("index_fails", [False, True])
def test_failed_header_clear_fails_the_write_the_drop_and_close(tmp_path, index_fails) -> None:
    io = FaultyIO()
    store = TieredStore(LAYOUT, config(tmp_path), io=io)
    k = ChunkKey(0, 0, 0)
    store.write(k, chunk(1))
    store.write((1, 0, 0), chunk(2))
    store.write((1, 0, 1), chunk(3))  # spills k
    assert store.where(k) == ("disk",)
    store.drop(1)  # host-only chunks: frees host slots, no disk I/O
    io.fail_calls("pwrite_header", 1000)
    with pytest.raises(TransferError, match="could not be cleared"):
        store.write(k, chunk(9))  # v1 would come back over v2 on reopen: not acknowledged
    got = read_one(store, k)
    assert got is not None and same(got, chunk(1))
    with pytest.raises(TransferError, match=r"drop\(0\).*1 of 1 headers not cleared"):
        store.drop(0)
    assert not store.contains(k)
    if index_fails:  # nothing on disk can say k was dropped: close must say so
        io.fail_calls("rename", 1000)
        with pytest.raises(TransferError, match="could not be cleared, and no index"):
            store.close()
    else:
        store.close()  # the clean-close index leaves k's uncleared slot out
    with pytest.raises(RuntimeError, match="closed"):
        store.write(k, chunk(9))
    with TieredStore(LAYOUT, config(tmp_path)) as reopened:
        if not index_fails:
            assert not reopened.contains(k)
            assert reopened.stats()["disk_open"]["refused_slots"] == {"not in the clean-close index": 1}


# ---------------------------------------------------------------- case 7: requires_grad
def test_chunk_that_requires_grad_does_not_poison_the_slab(tmp_path) -> None:
    with TieredStore(LAYOUT, config(None, disk=0)) as store:
        store.write((0, 0, 0), chunk(1))
        store.write((0, 0, 1), chunk(2).float().requires_grad_().to(LAYOUT.dtype))
        assert not store.host_slab.requires_grad
        got = read_one(store, (0, 0, 0))
        assert got is not None and same(got, chunk(1))
        out = torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype, requires_grad=True)
        with pytest.raises(ValueError, match="expected a buffer that does not require grad"):
            store.read([(0, 0, 0)], out)


# ---------------------------------------------------------------- case 8: full disk
def test_full_disk_leaks_no_slot_and_retries_clears_boundedly(tmp_path) -> None:
    io = FaultyIO()
    store = TieredStore(LAYOUT, config(tmp_path, host=1, disk=12), io=io)
    # A real full disk: space reservation and every header write (clears included) fail.
    io.fail_calls("reserve", 1000, errno.ENOSPC)
    io.fail_calls("pwrite_header", 1000, errno.ENOSPC)
    store.write((0, 0, 0), chunk(0))
    for i in range(1, 9):
        with pytest.raises(TransferError):
            store.write((0, 0, i), chunk(i))  # the spill of (0, 0, 0) fails every time
    st = store.stats()["disk"]
    assert st["used_bytes"] == 0 and st["failures"] == 8
    io.fail_calls("reserve", 0)
    io.fail_calls("pwrite_header", 0)
    for i in range(1, 12):  # 11 of 12 disk slots in use: every slot the failures touched was reusable
        store.write((1, 0, i), chunk(i))
    assert store.stats()["disk"]["chunks"] == 11  # (0, 0, 0) and 10 of seq 1; (1, 0, 11) in host
    io.fail_calls("pwrite_header", 1000, errno.EIO)
    before = io.calls["pwrite_header"]
    with pytest.raises(TransferError, match="10 of 11 headers not cleared"):
        store.drop(1)
    # One clear per dropped chunk, plus at most one retry round: not 1 + 2 + ... + 10.
    assert io.calls["pwrite_header"] - before <= 12
    io.fail_calls("pwrite_header", 0)
    store.close()  # the pending clears succeed now: nothing to report


# ---------------------------------------------------------------- case 9: close loses data
def test_close_raises_when_acknowledged_chunks_cannot_be_kept(tmp_path) -> None:
    io = FaultyIO(payload_bytes=CB)
    store = TieredStore(LAYOUT, config(tmp_path, host=4), io=io)
    for i in range(3):
        store.write((0, 0, i), chunk(i))
    io.inject("disk_full")
    with pytest.raises(TransferError, match="1 host-only chunks could not be written"):
        store.close()
    with TieredStore(LAYOUT, config(tmp_path, host=4)) as reopened:
        assert len(reopened) == 2  # what could be written was kept


# ---------------------------------------------------------------- case 10: copy error
def test_failed_copy_in_write_leaks_no_host_slot() -> None:
    with TieredStore(LAYOUT, config(None, host=2, disk=0)) as store:
        for i in range(4):
            with pytest.raises(ValueError, match="expected a CPU or CUDA tensor, got device meta"):
                store.write((0, 0, i), torch.empty(LAYOUT.chunk_shape, dtype=LAYOUT.dtype, device="meta"))
        assert store.stats()["host"]["used_bytes"] == 0
        store.write((0, 0, 0), chunk(0))
        store.write((0, 0, 1), chunk(1))
        assert len(store) == 2 and store.stats()["dropped"] == 0


# ---------------------------------------------------------------- case 13: boundaries
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"disk_dir": ""}, "disk_dir: expected a folder path or None, got ''"),
        ({"host_bytes": "99999999999999TiB"}, "host_bytes: expected a budget this machine can allocate"),
        ({"host_bytes": 2**60}, "host_bytes: expected a budget this machine can allocate"),
        ({"gpu_bytes": 2**60, "device": "cpu"}, "gpu_bytes: expected a budget this machine can allocate"),
        ({"gpu_bytes": CB, "device": "meta"}, "device: expected 'cpu', 'cuda' or 'cuda:N', got 'meta'"),
        ({"gpu_bytes": CB, "device": "cpu:1"}, "device: expected 'cpu' .one CPU device., got 'cpu:1'"),
        ({"gpu_bytes": CB, "device": "tpu"}, "device: expected 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_bad_configs_raise_config_error(kw: dict, match: str) -> None:
    base = {"gpu_bytes": 0, "host_bytes": CB, "disk_bytes": 0, "device": "cpu"}
    with pytest.raises(ConfigError, match=match):
        TieredStore(LAYOUT, StoreConfig(**{**base, **kw}))


def test_reads_into_meta_or_into_the_slab_are_refused() -> None:
    with TieredStore(LAYOUT, config(None, host=3, disk=0, gpu=1)) as store:
        store.write((0, 0, 0), chunk(0))
        store.write((0, 0, 1), chunk(1))
        with pytest.raises(ValueError, match="expected a CPU or CUDA tensor, got device meta"):
            store.read([(0, 0, 0)], torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype, device="meta"))
        victim = int(store.host_slots([(0, 0, 1)])[0])
        with pytest.raises(ValueError, match="view of the store's slab"):
            store.read([(0, 0, 0)], [store.host_slab[victim]])
        with pytest.raises(ValueError, match="view of the store's slab"):
            store.read([(0, 0, 0)], store.host_slab[victim : victim + 1])
        assert same(store.host_slab[victim], chunk(1))


def test_calls_after_close_raise() -> None:
    store = TieredStore(LAYOUT, config(None, disk=0))
    store.write((0, 0, 0), chunk(0))
    store.close()
    for call in (
        lambda: store.pin([(0, 0, 0)]),
        lambda: store.unpin([(0, 0, 0)]),
        lambda: store.where((0, 0, 0)),
        lambda: store.contains((0, 0, 0)),
        lambda: store.keys(),
        lambda: store.host_slots([(0, 0, 0)]),
        lambda: store.flush(),
    ):
        with pytest.raises(RuntimeError, match="expected an open store, got a closed one"):
            call()
    assert store.stats()["host"]["chunks"] == 1  # final counters stay readable


def test_store_without_disk_tier_says_it_drops(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kvtier"), TieredStore(LAYOUT, config(None, disk=0)) as store:
        for i in range(5):
            store.write((0, 0, i), chunk(i))
        assert store.stats()["dropped"] == 3
    assert sum("no disk tier" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO) == 1


def test_prefetch_without_host_room_is_a_counter_not_a_warning(tmp_path, caplog) -> None:
    with TieredStore(LAYOUT, config(tmp_path, host=1)) as store:
        store.write((0, 0, 0), chunk(0))
        store.write((0, 0, 1), chunk(1))  # (0, 0, 0) to disk
        store.pin([(0, 0, 1)])
        with caplog.at_level(logging.WARNING, logger="kvtier"):
            for _ in range(3):
                assert store.prefetch([(0, 0, 0)], to="host").wait(timeout=10) == [ChunkKey(0, 0, 0)]
        assert store.stats()["prefetch_no_room"] == 3
        assert not caplog.records
        store.unpin([(0, 0, 1)])


def test_default_disk_tier_is_a_private_temporary_folder() -> None:
    store = TieredStore(LAYOUT, StoreConfig(gpu_bytes=0, host_bytes=CB, device="cpu"))
    folder = Path(store._disk.directory)  # type: ignore[union-attr]
    assert folder.is_dir() and (os.stat(folder).st_mode & 0o777) == 0o700
    for i in range(4):  # far more than the host tier holds: nothing is dropped
        store.write((0, 0, i), chunk(i))
    assert all(same(read_one(store, (0, 0, i)), chunk(i)) for i in range(4))  # type: ignore[arg-type]
    store.close()
    assert not folder.exists()
