"""Crash trials below the page cache, checked against an expected-state model.

One trial runs random writes, drops, reads, sync points and clean reopens against a store
on :class:`kvtier._faults.VolatileIO`, then crashes it (a process death, a power loss, or
either at a kill point inside a store call), reopens it and reads every key. The model
says which results are legal:

- while the store runs, and after a clean reopen: exactly the last acknowledged version
  of each key (or absence, after a drop);
- after a process death: the last acknowledged version, or a miss (host-only chunks die
  with the process); never an older version;
- after a power loss: the version the last sync point (``sync()`` or ``close()``) made
  durable, or a miss; never a version replaced before that sync point, and never one
  written after it (it may be an intermediate version whose replacement was lost).

A store call interrupted by a kill point may or may not have taken effect: its new
version is legal too. Used by ``tests/tiers/test_crash_model.py`` and ``kvtier stress --crash``.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import torch

from kvtier._faults import Killed, VolatileIO
from kvtier.config import StoreConfig
from kvtier.layout import KVLayout
from kvtier.store import ChunkKey, TieredStore

__all__ = ["CRASH_KINDS", "crash_trial"]

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_size=4, group_size=2)
_KEYS = [ChunkKey(s, layer, c) for s in range(2) for layer in range(2) for c in range(2)]  # 8 keys
CRASH_KINDS = ("process", "power", "kill_process", "kill_power")


def _payload(version: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(version)
    raw = torch.randint(0, 256, (LAYOUT.chunk_bytes,), dtype=torch.uint8, generator=g)
    return raw.view(LAYOUT.dtype).view(LAYOUT.chunk_shape)


def _config(directory: Path) -> StoreConfig:
    # 3 host slots and 24 disk slots for 8 keys: constant spilling, never a disk eviction.
    cb = LAYOUT.chunk_bytes
    return StoreConfig(
        gpu_bytes=0, host_bytes=3 * cb, disk_bytes=24 * 8192, disk_dir=directory, device="cpu", io_threads=1
    )


def _read(store: TieredStore, key: ChunkKey) -> torch.Tensor | None:
    out = torch.empty(1, *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
    return None if store.read([key], out) else out[0].view(-1).view(torch.uint8).clone()


def _is(got: torch.Tensor | None, version: int | None) -> bool:
    if got is None or version is None:
        return got is None and version is None
    return torch.equal(got, _payload(version).reshape(-1).view(torch.uint8))


class _Trial:
    def __init__(self, directory: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.io = VolatileIO(seed)
        self.dir = directory
        self.store = TieredStore(LAYOUT, _config(directory), io=self.io)
        self.acked: dict[ChunkKey, int | None] = dict.fromkeys(_KEYS)
        self.durable: dict[ChunkKey, int | None] = dict.fromkeys(_KEYS)
        self.maybe: dict[ChunkKey, set[int | None]] = {k: set() for k in _KEYS}  # interrupted calls
        self.maybe_durable: dict[ChunkKey, set[int | None]] = {k: set() for k in _KEYS}
        # Keys written or dropped since the last sync point: only these may be missing after a crash.
        self.touched: set[ChunkKey] = set()
        self.version = seed * 1_000_000
        self.c: Counter[str] = Counter()

    def step(self) -> None:
        """One random operation; a read is checked exactly."""
        op = self.rng.choices(["write", "drop", "read", "sync", "reopen"], weights=[50, 6, 30, 8, 3])[0]
        k = self.rng.choice(_KEYS)
        if op == "write":
            self.version += 1
            self.maybe[k].add(self.version)  # until acknowledged, it may or may not be in
            self.touched.add(k)
            self.store.write(k, _payload(self.version))
            self.acked[k] = self.version
            self.maybe[k].clear()
        elif op == "drop":
            gone = [key for key in _KEYS if key.seq_id == k.seq_id]
            for key in gone:
                self.maybe[key].add(None)
            self.touched.update(gone)
            self.store.drop(k.seq_id)
            for key in gone:
                self.acked[key] = None
                self.maybe[key].clear()
        elif op == "read":
            self.c["reads"] += 1
            if not _is(_read(self.store, k), self.acked[k]):
                self.c["mismatches_live"] += 1
        elif op == "sync":
            for key in _KEYS:
                self.maybe_durable[key] = {self.acked[key]}
            self.store.sync()
            self.durable = dict(self.acked)
            self.touched = set()
            for key in _KEYS:
                self.maybe_durable[key].clear()
            self.c["syncs"] += 1
        else:
            for key in _KEYS:  # close is a sync point: interrupted, it may or may not have made it
                self.maybe_durable[key] = {self.acked[key]}
            self.store.close()
            self.durable = dict(self.acked)
            self.touched = set()
            for key in _KEYS:
                self.maybe_durable[key].clear()
            self.store = TieredStore(LAYOUT, _config(self.dir), io=self.io)
            for key in _KEYS:  # a clean close keeps everything (the disk budget holds all keys)
                self.c["reads"] += 1
                if not _is(_read(self.store, key), self.acked[key]):
                    self.c["mismatches_reopen"] += 1
            self.c["reopens"] += 1

    def crash(self, kind: str) -> None:
        if kind.startswith("kill"):
            self.io.kill_after(self.rng.randint(0, 40))
            try:
                for _ in range(200):
                    self.step()
            except Killed:
                self.c["killed_in_call"] += 1
        try:
            self.store._abandon()
        except Killed:
            pass
        if kind.endswith("power"):
            self.io.power_loss()
        else:
            self.io.process_crash()
        self.store = TieredStore(LAYOUT, _config(self.dir), io=self.io)
        power = kind.endswith("power")
        for k in _KEYS:
            # A chunk untouched since the last sync point must survive any crash as that version;
            # one written or dropped since may be missing (host-only, or its clear or copy lost).
            if power:
                legal = {self.durable[k]} | self.maybe_durable[k]
            else:
                legal = {self.acked[k]} | self.maybe[k] | self.maybe_durable[k]
            if k in self.touched or self.maybe_durable[k]:
                legal.add(None)
            got = _read(self.store, k)
            self.c["reads"] += 1
            if not any(_is(got, v) for v in legal):
                self.c["mismatches_after_crash"] += 1
            elif got is None and self.acked[k] is not None:
                self.c["lost_in_crash"] += 1  # allowed: not made durable / host only
        self.store.close()


def crash_trial(directory: Path, seed: int, kind: str | None = None) -> Counter[str]:
    """One trial in ``directory`` (created): random steps, one crash, every key checked.

    Returns
    -------
    collections.Counter
        ``reads``, ``mismatches_live``, ``mismatches_reopen``, ``mismatches_after_crash``
        (all three must be 0), ``lost_in_crash``, ``syncs``, ``reopens``,
        ``killed_in_call``, ``lost_pages`` and one count for the crash kind.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    t = _Trial(directory, seed)
    for _ in range(t.rng.randint(3, 40)):
        t.step()
    kind = kind or t.rng.choice(CRASH_KINDS)
    t.crash(kind)
    t.c[kind] += 1
    t.c["lost_pages"] += t.io.lost_pages
    return t.c
