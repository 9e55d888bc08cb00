"""TieredStore behaviour: placement, spill, pinning, prefetch, drop, reopen, stats, bad inputs."""

from __future__ import annotations

import pytest
import torch

from kvtier import (
    CapacityError,
    ChunkKey,
    ConfigError,
    KVLayout,
    LayoutMismatchError,
    StoreConfig,
    TieredStore,
    TierUnavailableError,
)

LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, chunk_size=16, group_size=8
)
CB = LAYOUT.chunk_bytes  # 8 KiB: host slots land page-aligned, so disk reads are zero-copy


def chunk(seed: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (layout.chunk_bytes,), dtype=torch.uint8, generator=g)
    return raw.view(layout.dtype).view(layout.chunk_shape).clone()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def make(tmp_path, *, host=3, gpu=2, disk=20, **kw) -> TieredStore:
    cfg = StoreConfig(
        gpu_bytes=gpu * CB,
        host_bytes=host * CB,
        disk_bytes=disk * (CB + 4096),
        disk_dir=tmp_path if disk else None,
        device="cpu",
        io_threads=2,
        **kw,
    )
    return TieredStore(LAYOUT, cfg)


def read_one(store: TieredStore, key) -> torch.Tensor | None:
    out = torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
    return None if store.read([key], out) else out[0]


def test_write_spills_lru_to_disk_and_reads_back(tmp_path) -> None:
    with make(tmp_path) as store:
        keys = [ChunkKey(0, i % 2, i) for i in range(6)]
        for i, k in enumerate(keys):
            store.write(k, chunk(i))
        assert [store.where(k) for k in keys] == [("disk",)] * 3 + [("host",)] * 3
        out = torch.empty(6, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
        assert store.read(keys, out) == []
        assert all(same(out[i], chunk(i)) for i in range(6))
        st = store.stats()
        assert st["host"]["evictions"] == 3 and st["disk"]["bytes_written"] == 3 * CB
        assert st["disk"]["hits"] == 3 and st["host"]["hits"] == 3 and st["misses"] == 0
        assert st["disk_io"]["backend"] == "posix"
        for tier in ("device", "host", "disk"):
            assert st[tier]["used_bytes"] <= st[tier]["capacity_bytes"]


def test_read_into_list_of_buffers_and_misses(tmp_path) -> None:
    with make(tmp_path, disk=0) as store:
        store.write((1, 0, 0), chunk(1))
        outs = [torch.empty(LAYOUT.chunk_shape, dtype=LAYOUT.dtype) for _ in range(2)]
        assert store.read([(1, 0, 0), (1, 0, 9)], outs) == [ChunkKey(1, 0, 9)]
        assert same(outs[0], chunk(1)) and store.stats()["misses"] == 1


def test_without_disk_tier_lru_chunk_is_dropped(tmp_path) -> None:
    with make(tmp_path, disk=0) as store:
        for i in range(4):
            store.write((0, 0, i), chunk(i))
        assert not store.contains((0, 0, 0)) and store.contains((0, 0, 3)) and len(store) == 3


def test_overwrite_replaces_and_frees_old_copies(tmp_path) -> None:
    with make(tmp_path) as store:
        for i in range(5):
            store.write((0, 0, i), chunk(i))
        assert store.where((0, 0, 0)) == ("disk",)
        store.write((0, 0, 0), chunk(100))
        assert same(read_one(store, (0, 0, 0)), chunk(100))
        assert store.stats()["disk"]["used_bytes"] == 2 * (CB + 4096)  # old disk copy released


def test_prefetch_to_host_and_device(tmp_path) -> None:
    with make(tmp_path) as store:
        keys = [ChunkKey(3, 0, i) for i in range(5)]
        for i, k in enumerate(keys):
            store.write(k, chunk(i))
        h = store.prefetch(keys[:2], to="host")
        assert h.wait(timeout=30) == [] and h.done()
        assert all("host" in store.where(k) for k in keys[:2])
        h = store.prefetch(keys[:2] + [ChunkKey(9, 0, 0)], to="device")
        assert h.wait(timeout=30) == [ChunkKey(9, 0, 0)]
        slots = store.device_slots(keys[:3]).tolist()
        assert slots[2] == -1 and sorted(slots[:2]) == [0, 1]
        for k, s in zip(keys[:2], slots):
            assert same(store.device_slab[s], chunk(keys.index(k)))
        hs = store.host_slots(keys).tolist()
        for i, s in enumerate(hs):
            if s >= 0:
                assert same(store.host_slab[s], chunk(i))


def test_pinned_chunk_is_never_evicted_and_slot_is_stable(tmp_path) -> None:
    with make(tmp_path) as store:
        store.write((0, 0, 0), chunk(0))
        store.pin([(0, 0, 0)])
        slot = store.host_slots([(0, 0, 0)]).item()
        for i in range(1, 10):
            store.write((0, 0, i), chunk(i))
        assert store.host_slots([(0, 0, 0)]).item() == slot and same(store.host_slab[slot], chunk(0))
        store.pin([(0, 0, 1 + 8), (0, 0, 8)])
        with pytest.raises(CapacityError, match="every used slot pinned"):
            store.write((0, 0, 50), chunk(50))
        store.unpin([(0, 0, 0), (0, 0, 9), (0, 0, 8)])
        store.write((0, 0, 50), chunk(50))
        assert store.stats()["pinned_keys"] == 0


def test_drop_and_overwrite_of_pinned_key_defer_the_free(tmp_path) -> None:
    with make(tmp_path, host=2) as store:
        store.write((5, 0, 0), chunk(0))
        store.pin([(5, 0, 0)])
        slot = store.host_slots([(5, 0, 0)]).item()
        assert store.drop(5) == 1 and not store.contains((5, 0, 0))
        for i in range(1, 6):
            store.write((6, 0, i), chunk(i))
        assert same(store.host_slab[slot], chunk(0))  # a zero-copy reader is still safe
        store.unpin([(5, 0, 0)])
        store.write((6, 0, 9), chunk(9))
        assert store.drop(6) == 6 and len(store) == 0
        assert store.stats()["disk"]["used_bytes"] == 0 and store.stats()["host"]["used_bytes"] == 0


def test_close_flushes_and_reopen_rebuilds_index(tmp_path) -> None:
    with make(tmp_path) as store:
        for i in range(5):
            store.write((2, 1, i), chunk(i))
        store.drop(7)
        store.write((7, 0, 0), chunk(70))
        store.drop(7)
    with make(tmp_path) as store:
        assert sorted(store.keys()) == [ChunkKey(2, 1, i) for i in range(5)]
        for i in range(5):
            assert same(read_one(store, (2, 1, i)), chunk(i))


def test_reopen_with_other_layout_raises(tmp_path) -> None:
    with make(tmp_path) as store:
        store.write((0, 0, 0), chunk(0))
    other = KVLayout(
        num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_size=16, group_size=8
    )
    cfg = StoreConfig(
        gpu_bytes=0, host_bytes=4 * CB, disk_bytes=20 * (CB + 4096), disk_dir=tmp_path, device="cpu"
    )
    with pytest.raises(LayoutMismatchError, match="expected layout fingerprint"):
        TieredStore(other, cfg)


def test_bad_inputs_raise_clear_errors(tmp_path) -> None:
    with make(tmp_path) as store:
        good = chunk(0)
        with pytest.raises(TypeError, match="expected dtype"):
            store.write((0, 0, 0), good.float())
        with pytest.raises(ValueError, match=r"expected shape \[2, 2, 16, 64\]"):
            store.write((0, 0, 0), good[:, :1])
        with pytest.raises(ValueError, match="expected a contiguous tensor"):
            store.write((0, 0, 0), good.transpose(2, 3).contiguous().transpose(2, 3))
        with pytest.raises(TypeError, match="expected a torch.Tensor"):
            store.write((0, 0, 0), [1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key.layer: expected < num_layers=2"):
            store.write((0, 2, 0), good)
        with pytest.raises(ValueError, match=r"key.seq_id: expected an int in \[0, 2\*\*63\)"):
            store.write((-1, 0, 0), good)
        with pytest.raises(TypeError, match="key: expected a"):
            store.write("0,0,0", good)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="single key tuple"):
            store.read((0, 0, 0), torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype))
        with pytest.raises(ValueError, match=r"out: expected shape \[2, 2, 2, 16, 64\]"):
            store.read([(0, 0, 0), (0, 0, 1)], torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype))
        with pytest.raises(TypeError, match="out: expected dtype"):
            store.read([(0, 0, 0)], torch.empty(1, *LAYOUT.chunk_shape))
        with pytest.raises(ValueError, match="out: expected a contiguous tensor"):
            store.read([(0, 0, 0)], torch.empty(1, 2, 2, 64, 16, dtype=LAYOUT.dtype).transpose(3, 4))
        with pytest.raises(ValueError, match="to: expected 'host' or 'device'"):
            store.prefetch([(0, 0, 0)], to="disk")
        with pytest.raises(KeyError, match="expected stored keys"):
            store.pin([(0, 0, 0)])
        with pytest.raises(ValueError, match="expected pinned keys"):
            store.unpin([(0, 0, 0)])
    with pytest.raises(RuntimeError, match="expected an open store"):
        store.write((0, 0, 0), good)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"host_bytes": CB - 1}, "HostTier.capacity_bytes: expected a budget of at least one slot"),
        ({"gpu_bytes": CB - 1}, "gpu_bytes: expected 0 or at least one chunk"),
        ({"disk_bytes": CB, "disk_dir": "DIR"}, "disk_bytes: expected at least one disk slot"),
    ],
)
def test_budgets_too_small_for_one_chunk(tmp_path, kw: dict, match: str) -> None:
    kw = {k: (tmp_path if v == "DIR" else v) for k, v in kw.items()}
    cfg = StoreConfig(**{"gpu_bytes": 0, "host_bytes": 4 * CB, "device": "cpu", **kw})
    with pytest.raises(ConfigError, match=match):
        TieredStore(LAYOUT, cfg)


def test_device_tier_needs_the_device(tmp_path) -> None:
    with make(tmp_path, gpu=0) as store:
        with pytest.raises(TierUnavailableError, match="expected a device tier, got gpu_bytes=0"):
            store.prefetch([(0, 0, 0)], to="device")
        assert store.device_slab is None
    if not torch.cuda.is_available():
        with pytest.raises(TierUnavailableError, match="without CUDA"):
            TieredStore(LAYOUT, StoreConfig(gpu_bytes=CB, host_bytes=CB, device="cuda"))
    with pytest.raises(TypeError, match="layout: expected a KVLayout"):
        TieredStore("layout", StoreConfig())  # type: ignore[arg-type]


def _many_block_prefetch(tmp_path, device: str) -> None:
    """A device prefetch of more keys than one copy sub-batch (256 chunks): host-resident
    keys in scattered host slots, disk-only keys and absent keys in one call."""
    n = 360
    cfg = StoreConfig(
        gpu_bytes=(n + 8) * CB,
        host_bytes=(n + 8) * CB,
        disk_bytes=(n + 64) * (CB + 4096),
        disk_dir=tmp_path,
        device=device,
        io_threads=2,
    )
    with TieredStore(LAYOUT, cfg) as store:
        keys = [ChunkKey(1, i % 2, i) for i in range(n + 40)]
        for i, k in enumerate(keys):
            store.write(k, chunk(i))  # the first 40 spill to disk
        # Scatter host slots: rewrite every third key, so its new slot is elsewhere.
        for i in range(40, n + 40, 3):
            store.write(keys[i], chunk(i))
        absent = [ChunkKey(2, 0, j) for j in range(5)]
        on_host = {k for k in keys if "host" in store.where(k)}
        assert len(on_host) > 256 and len(on_host) < len(keys)
        failed = store.prefetch(keys[::-1] + absent, to="device").wait(timeout=60)
        # Absent keys fail; disk-only keys may fail for want of a host slot (every host slot
        # is held by this call's own transfers); host-resident keys all land on the device.
        assert set(absent) <= set(failed) and not on_host & set(failed)
        slots = store.device_slots(keys).tolist()
        resident = [(i, s) for i, s in enumerate(slots) if s >= 0]
        assert {keys[i] for i, _ in resident} >= on_host
        assert len({s for _, s in resident}) == len(resident)
        for i, s in resident:
            assert same(store.device_slab[s].cpu(), chunk(i)), i
        assert store.stats()["device"]["bytes_written"] >= n * CB


def test_prefetch_to_device_in_many_sub_batches_is_bit_exact(tmp_path) -> None:
    _many_block_prefetch(tmp_path, "cpu")


def test_failed_device_copy_reports_keys_and_frees_slots(tmp_path, monkeypatch) -> None:
    import kvtier.store_prefetch as store_mod

    with make(tmp_path, host=4, gpu=4) as store:
        keys = [ChunkKey(0, 0, i) for i in range(4)]
        for i, k in enumerate(keys):
            store.write(k, chunk(i))

        def broken(*args, **kwargs):
            raise RuntimeError("copy engine fault")

        monkeypatch.setattr(store_mod, "copy_chunks", broken)
        assert sorted(store.prefetch(keys, to="device").wait(timeout=30)) == keys
        assert store.device_slots(keys).tolist() == [-1] * 4
        monkeypatch.undo()
        assert store.prefetch(keys, to="device").wait(timeout=30) == []  # every slot came back
        for i, s in enumerate(store.device_slots(keys).tolist()):
            assert same(store.device_slab[s], chunk(i))


# ---------------------------------------------------------------- GPU machine only
@pytest.mark.gpu
def test_gpu_prefetch_to_device_in_many_sub_batches_is_bit_exact(tmp_path) -> None:
    _many_block_prefetch(tmp_path, "cuda")


@pytest.mark.gpu
def test_gpu_prefetch_to_device_and_read_into_cuda(tmp_path) -> None:
    cfg = StoreConfig(
        gpu_bytes=4 * CB,
        host_bytes=4 * CB,
        disk_bytes=64 * (CB + 4096),
        disk_dir=tmp_path,
        device="cuda",
        io_backend="posix",
    )
    with TieredStore(LAYOUT, cfg) as store:
        assert store.host_pinned and store.device_slab.is_cuda
        keys = [ChunkKey(0, 0, i) for i in range(12)]
        for i, k in enumerate(keys):
            store.write(k, chunk(i).cuda())
        h = store.prefetch(keys[-4:], to="device")
        assert h.wait(timeout=60) == []
        for k, s in zip(keys[-4:], store.device_slots(keys[-4:]).tolist()):
            assert same(store.device_slab[s].cpu(), chunk(keys.index(k)))
        out = torch.empty(12, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype, device="cuda")
        assert store.read(keys, out) == []
        assert all(same(out[i].cpu(), chunk(i)) for i in range(12))
        h = store.prefetch(keys[:4], to="device")  # disk -> pinned host -> HBM
        assert h.wait(timeout=60) == []
        for k, s in zip(keys[:4], store.device_slots(keys[:4]).tolist()):
            assert same(store.device_slab[s].cpu(), chunk(keys.index(k)))


@pytest.mark.gpu
def test_gpu_kvikio_backend_round_trip(tmp_path) -> None:
    from kvtier.tiers.io import kvikio_status

    status = kvikio_status()
    if not status["available"]:
        pytest.skip(f"kvikio unavailable: {status['reason']}")
    cfg = StoreConfig(
        gpu_bytes=2 * CB,
        host_bytes=2 * CB,
        disk_bytes=64 * (CB + 4096),
        disk_dir=tmp_path,
        device="cuda",
        io_backend="kvikio",
    )
    with TieredStore(LAYOUT, cfg) as store:
        for i in range(8):
            store.write((0, 0, i), chunk(i))
        out = torch.empty(8, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
        assert store.read([(0, 0, i) for i in range(8)], out) == []
        assert all(same(out[i], chunk(i)) for i in range(8))
        assert store.stats()["disk_io"]["backend"] == "kvikio"
        assert "kvikio" in store.stats()["disk_io"]["reason"]


def test_eviction_policy_is_pluggable(tmp_path) -> None:
    from collections import OrderedDict

    class MostRecentFirst:
        """Evicts the most recently used chunk first (the opposite of LRU)."""

        def __init__(self) -> None:
            self._order: OrderedDict = OrderedDict()

        def touch(self, key) -> None:
            self._order[key] = None
            self._order.move_to_end(key, last=False)

        def remove(self, key) -> None:
            self._order.pop(key, None)

        def candidates(self):
            return iter(self._order)

        def __len__(self) -> int:
            return len(self._order)

    cfg = StoreConfig(
        gpu_bytes=0, host_bytes=2 * CB, disk_bytes=8 * (CB + 4096), disk_dir=tmp_path, device="cpu"
    )
    with TieredStore(LAYOUT, cfg, policy=MostRecentFirst) as store:
        for i in range(3):
            store.write((0, 0, i), chunk(i))
        assert store.where((0, 0, 1)) == ("disk",) and store.where((0, 0, 0)) == ("host",)


def test_concurrent_clients_see_their_own_bytes(tmp_path) -> None:
    """Four threads write, read, prefetch and drop their own sequences at once."""
    import random
    import threading

    errors: list[str] = []
    with make(tmp_path, host=4, gpu=2, disk=64) as store:

        def client(seq: int) -> None:
            rng = random.Random(seq)
            mine: dict[ChunkKey, int] = {}
            for step in range(150):
                key = ChunkKey(seq, rng.randrange(2), rng.randrange(6))
                op = rng.random()
                if op < 0.4:
                    store.write(key, chunk(1000 * seq + step))
                    mine[key] = 1000 * seq + step
                elif op < 0.7 and mine:
                    keys = rng.sample(sorted(mine), min(3, len(mine)))
                    out = torch.empty(len(keys), *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
                    missed = store.read(keys, out)
                    if missed:
                        errors.append(f"seq {seq}: lost {missed}")
                    for i, k in enumerate(keys):
                        if not same(out[i], chunk(mine[k])):
                            errors.append(f"seq {seq}: wrong bytes for {k}")
                elif op < 0.95 and mine:
                    keys = rng.sample(sorted(mine), min(3, len(mine)))
                    store.prefetch(keys, to=rng.choice(["host", "device"])).wait(timeout=30)
                else:
                    store.drop(seq)
                    mine.clear()

        def guarded(seq: int) -> None:
            try:
                client(seq)
            except Exception as exc:  # noqa: BLE001  (reported below, with the thread's sequence)
                errors.append(f"seq {seq}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=guarded, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        stats = store.stats()
    assert errors == []
    for tier in ("device", "host", "disk"):
        assert stats[tier]["used_bytes"] <= stats[tier]["capacity_bytes"]


def test_every_host_slot_watcher_and_fence_is_called(tmp_path) -> None:
    """Several engines share a store (a padded batch, one per row): each watcher and fence sees every change."""
    store = make(tmp_path, host=2, gpu=0)
    seen: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    fences: list[str] = []
    watch_a = lambda key, slot: seen["a"].append((key.seq_id, slot))  # noqa: E731
    watch_b = lambda key, slot: seen["b"].append((key.seq_id, slot))  # noqa: E731
    fence_a = lambda: fences.append("a")  # noqa: E731
    store.watch_host_slots(watch_a)
    store.watch_host_slots(watch_b)
    store.add_host_fence(fence_a)
    store.add_host_fence(lambda: fences.append("b"))
    store.write((0, 0, 0), chunk(0))
    store.write((1, 0, 0), chunk(1))
    assert seen["a"] == seen["b"] and [s for s, _ in seen["a"]] == [0, 1]
    store.write((2, 0, 0), chunk(2))  # evicts seq 0's chunk to disk: both fences run first
    assert fences == ["a", "b"]
    store.unwatch_host_slots(watch_a)
    store.remove_host_fence(fence_a)
    store.drop(1)
    assert seen["a"][-1][0] == 2 and seen["b"][-1] == (1, -1)
    with pytest.raises(TypeError, match="callback: expected a callable, got NoneType"):
        store.watch_host_slots(None)  # type: ignore[arg-type]
    store.close()
