"""Concurrency (issue 10, case 12): several threads on one store, every read checked against
the versions that could legally be visible; the atomic pin-and-slot call; the 5 s wait."""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
import torch

from kvtier import CapacityError, ChunkKey, KVLayout, StoreConfig, TieredStore
from kvtier._faults import FaultyIO

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_size=4, group_size=2)
CB = LAYOUT.chunk_bytes
KEYS = [ChunkKey(s, layer, c) for s in range(2) for layer in range(2) for c in range(3)]  # 12 keys


def payload(version: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(version)
    return torch.randint(0, 256, (CB,), dtype=torch.uint8, generator=g)


class History:
    """Per key, the writes and drops with logical start and end times.

    A version ``v`` may be seen by a read spanning ``[t0, t1]`` if it started before ``t1``
    and no later change ``w`` (one that started after ``v`` ended) had ended before ``t0``.
    ``None`` is absence (never written, or dropped).
    """

    def __init__(self) -> None:
        self.clock = itertools.count()
        self.events: dict[ChunkKey, list[tuple[float, float, int | None]]] = {
            k: [(-1, -1, None)] for k in KEYS
        }
        self.lock = threading.Lock()
        self.payloads: dict[int, torch.Tensor] = {}

    def now(self) -> int:
        return next(self.clock)

    def begin(self, key: ChunkKey, version: int | None) -> tuple[ChunkKey, int, int | None]:
        """Record a change as started (pending: it ends at infinity until :meth:`end`)."""
        with self.lock:
            start = self.now()
            self.events[key].append((start, float("inf"), version))
            return key, start, version

    def end(self, change: tuple[ChunkKey, int, int | None], *, done: bool = True) -> None:
        key, start, version = change
        with self.lock:
            self.events[key].remove((start, float("inf"), version))
            if done:
                self.events[key].append((start, self.now(), version))

    def legal(self, key: ChunkKey, t0: int, t1: int) -> set[int | None]:
        with self.lock:
            ev = list(self.events[key])
        return {
            v for s, e, v in ev if s < t1 and not any(e < s2 and e2 < t0 for s2, e2, _ in ev)
        }

    def matches(self, key: ChunkKey, got: torch.Tensor | None, t0: int, t1: int) -> bool:
        legal = self.legal(key, t0, t1)
        if got is None:
            return None in legal
        flat = got.reshape(-1).view(torch.uint8)
        return any(v is not None and torch.equal(flat, self.payloads[v]) for v in legal)


def _worker(store: TieredStore, hist: History, seed: int, ops: int, errors: list[str]) -> None:
    rng = random.Random(seed)
    out = torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
    for i in range(ops):
        k = rng.choice(KEYS)
        op = rng.random()
        t0 = hist.now()
        if op < 0.35:
            version = seed * 100_000 + i
            hist.payloads[version] = payload(version)
            change = hist.begin(k, version)
            try:
                store.write(k, hist.payloads[version].view(LAYOUT.dtype).view(LAYOUT.chunk_shape))
            except CapacityError:  # every slot pinned by the other threads: reported, nothing changed
                hist.end(change, done=False)
                continue
            hist.end(change)
        elif op < 0.40:
            changes = [hist.begin(key, None) for key in KEYS if key.seq_id == k.seq_id]
            store.drop(k.seq_id)
            for change in changes:
                hist.end(change)
        elif op < 0.70:
            missed = store.read([k], out)
            got = None if missed else out[0]
            if not hist.matches(k, got, t0, hist.now()):
                errors.append(f"read {tuple(k)} at [{t0}, ...]: a version that was not visible")
        elif op < 0.80:
            store.prefetch([k], to="host").wait(timeout=30)
        else:
            try:
                slots = store.pin_host_slots([k])
            except KeyError:
                if not hist.matches(k, None, t0, hist.now()):
                    errors.append(f"pin {tuple(k)}: missing while it had to be stored")
                continue
            t1 = hist.now()
            slot = int(slots[0])
            if slot >= 0:
                seen = store.host_slab[slot].clone()
                if not hist.matches(k, seen, t0, t1):
                    errors.append(f"pin_host_slots {tuple(k)}: slot {slot} holds a version not visible")
                for _ in range(3):  # other threads keep working; the pinned bytes must not move
                    time.sleep(0)
                if not torch.equal(store.host_slab[slot].view(torch.uint8), seen.view(torch.uint8)):
                    errors.append(f"pin_host_slots {tuple(k)}: slot {slot} changed while pinned")
            store.unpin([k])


def test_threads_only_ever_see_legal_versions(tmp_path) -> None:
    cfg = StoreConfig(
        gpu_bytes=0, host_bytes=6 * CB, disk_bytes=48 * 8192, disk_dir=tmp_path, device="cpu", io_threads=2
    )
    hist = History()
    errors: list[str] = []
    with TieredStore(LAYOUT, cfg) as store:
        threads = [
            threading.Thread(target=_worker, args=(store, hist, seed, 300, errors)) for seed in range(1, 5)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
        t = hist.now()
        for k in KEYS:  # quiescent: exactly the last version (or absence) of each key
            missed = store.read([k], out)
            assert hist.matches(k, None if missed else out[0], t, t)
    assert errors == []
    assert sum(len(v) for v in hist.events.values()) > 200


def test_pin_host_slots_returns_the_pinned_version_not_a_newer_one(tmp_path) -> None:
    cfg = StoreConfig(gpu_bytes=0, host_bytes=4 * CB, disk_bytes=0, device="cpu")
    with TieredStore(LAYOUT, cfg) as store:
        k = KEYS[0]
        store.write(k, payload(1).view(LAYOUT.dtype).view(LAYOUT.chunk_shape))
        slot = int(store.pin_host_slots([k])[0])
        store.write(k, payload(2).view(LAYOUT.dtype).view(LAYOUT.chunk_shape))  # another thread's write
        assert int(store.host_slots([k])[0]) != slot  # the newer version lives elsewhere
        assert torch.equal(store.host_slab[slot].reshape(-1).view(torch.uint8), payload(1))
        store.unpin([k])
        with pytest.raises(KeyError, match="expected stored keys"):
            store.pin_host_slots([KEYS[1]])


def test_write_waits_for_transfers_in_flight(tmp_path) -> None:
    io = FaultyIO()
    cfg = StoreConfig(
        gpu_bytes=0, host_bytes=2 * CB, disk_bytes=16 * 8192, disk_dir=tmp_path, device="cpu", io_threads=2
    )
    with TieredStore(LAYOUT, cfg, io=io) as store:
        for i, k in enumerate(KEYS[:4]):
            store.write(k, payload(i).view(LAYOUT.dtype).view(LAYOUT.chunk_shape))
        assert store.where(KEYS[0]) == ("disk",) and store.where(KEYS[1]) == ("disk",)
        io.read_delay_s = 0.4  # both host slots are taken by these reads for 0.4 s
        handle = store.prefetch([KEYS[0], KEYS[1]], to="host")
        time.sleep(0.1)
        t0 = time.monotonic()
        store.write(KEYS[5], payload(9).view(LAYOUT.dtype).view(LAYOUT.chunk_shape))  # must wait, not raise
        assert 0.1 < time.monotonic() - t0 < 5.0
        handle.wait(timeout=10)


def test_write_waits_for_another_threads_pins_but_not_its_own(tmp_path) -> None:
    cfg = StoreConfig(gpu_bytes=0, host_bytes=2 * CB, disk_bytes=0, device="cpu")
    with TieredStore(LAYOUT, cfg) as store:
        for i, k in enumerate(KEYS[:2]):
            store.write(k, payload(i).view(LAYOUT.dtype).view(LAYOUT.chunk_shape))
        store.pin(KEYS[:2])
        with pytest.raises(CapacityError, match="every used slot pinned by this thread"):
            store.write(KEYS[2], payload(2).view(LAYOUT.dtype).view(LAYOUT.chunk_shape))
        store.unpin(KEYS[:2])
        pinned = threading.Event()

        def hold() -> None:
            store.pin(KEYS[:2])
            pinned.set()
            time.sleep(0.3)
            store.unpin(KEYS[:2])

        t = threading.Thread(target=hold)
        t.start()
        pinned.wait()
        t0 = time.monotonic()
        store.write(KEYS[2], payload(2).view(LAYOUT.dtype).view(LAYOUT.chunk_shape))  # waits for the unpin
        assert 0.1 < time.monotonic() - t0 < 5.0
        t.join()
