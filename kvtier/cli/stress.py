"""``kvtier stress``: a random store workload with injected faults, every byte checked.

Small budgets force constant spilling, promotion and eviction. Operations: writes,
reads, prefetches to host and device, pins and unpins, drops, clean reopens, crashes
(a writer killed mid-slot, then the process "dies": no flush) and faults injected
through :class:`kvtier._faults.FaultyIO` (I/O errors, short reads, bits flipped in
transit, a full disk, torn writes) or at rest (a bit flipped in a slab file).

Every read is compared with a shadow copy of the last version written. Reported:

- ``mismatches``: bytes served that differ from the last version of their key, a dropped
  key served or still listed, or a pinned slot whose bytes changed. Must be 0.
- ``budget_violations``: a tier holding more than its budget. Must be 0.
- ``unexpected_misses``: a key missed with no fault, crash or eviction to explain it, or
  missing after a clean reopen. Must be 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from kvtier._crash import crash_trial
from kvtier._faults import READ_FAULTS, WRITE_FAULTS, FaultyIO, flip_bit_on_disk
from kvtier._multiproc import run_processes
from kvtier.cli.args import fraction, positive_float
from kvtier.config import StoreConfig
from kvtier.errors import CapacityError, TransferError
from kvtier.layout import KVLayout
from kvtier.store import ChunkKey, TieredStore

__all__ = ["add_arguments", "crash_trials", "process_trials", "run", "stress"]

# 2 layers x 2 KV heads x 8 tokens x 16 dims in fp16: 1 KiB chunks, so a second of
# stress runs hundreds of operations even on 2 CPU cores.
_LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_size=8, group_size=4)
_KEYS = [ChunkKey(s, layer, c) for s in range(4) for layer in range(2) for c in range(6)]  # 48 keys
_OPS = {
    "write": 30,
    "read": 25,
    "prefetch_host": 8,
    "prefetch_device": 8,
    "pin": 5,
    "unpin": 5,
    "drop": 3,
    "reopen": 2,
    "crash": 1,
    "flip_at_rest": 2,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kvtier stress``."""
    parser.add_argument("--seconds", type=positive_float, default=10.0, help="how long to run (default 10)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="folder for the store's files, removed afterwards (default: the system's temporary folder)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and of the faults")
    parser.add_argument(
        "--fault-rate",
        type=fraction,
        default=0.02,
        help="probability of each injected I/O fault per operation (default 0.02)",
    )
    parser.add_argument(
        "--crash",
        action="store_true",
        help="also run crash trials below the page cache (process deaths, power losses, kill points), "
        "checked against an expected-state model",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="also run this many processes contending for one store folder (its lock), each checking "
        "what it finds against what the others acknowledged (default 0: off)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Stress:
    """The workload, its shadow and its counters."""

    def __init__(self, directory: Path, seed: int, fault_rate: float) -> None:
        self.dir = directory
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        rates = {f: fault_rate for f in READ_FAULTS + WRITE_FAULTS}
        self.io = FaultyIO(payload_bytes=_LAYOUT.chunk_bytes, rates=rates, seed=seed)
        cb = _LAYOUT.chunk_bytes
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # 6 host slots, 4 device slots, 64 disk slots for 48 keys: disk evictions should
        # not happen (3 pins at most), so every miss must have a fault or crash behind it.
        self.config = StoreConfig(
            gpu_bytes=4 * cb,
            host_bytes=6 * cb,
            disk_bytes=64 * (cb + 8192),
            disk_dir=directory,
            device=self.device,
            io_threads=2,
        )
        self.store = TieredStore(_LAYOUT, self.config, io=self.io)
        self.shadow: dict[ChunkKey, torch.Tensor] = {}
        self.tainted: set[ChunkKey] = set()
        self.dropped: set[ChunkKey] = set()
        self.pins: list[tuple[ChunkKey, int, torch.Tensor]] = []  # (key, host slot or -1, bytes)
        self.c: Counter[str] = Counter()
        self.ops_by_kind: Counter[str] = Counter()
        self._evictions_seen = 0

    # ------------------------------------------------------------------ checks
    def _same(self, got: torch.Tensor, want: torch.Tensor) -> bool:
        ok = torch.equal(got.reshape(-1).view(torch.uint8).cpu(), want.reshape(-1).view(torch.uint8))
        if ok:
            self.c["bytes_verified"] += want.numel() * want.element_size()
        else:
            self.c["mismatches"] += 1
        return ok

    def _check_missed(self, keys: list[ChunkKey], missed: set[ChunkKey], faults_before: int) -> None:
        fault_now = sum(self.io.injected.values()) > faults_before
        for k in missed & set(self.shadow):  # a miss of a key never written is no news
            self.c["misses"] += 1
            if k not in self.tainted:
                if fault_now:
                    self.tainted.add(k)  # this op's fault explains it (a corrupt copy is discarded)
                else:
                    self.c["unexpected_misses"] += 1

    def _check_invariants(self) -> None:
        st = self.store.stats()
        for tier, budget in (
            ("device", self.config.gpu_bytes),
            ("host", self.config.host_bytes),
            ("disk", self.config.disk_bytes),
        ):
            if not st[tier]["used_bytes"] <= st[tier]["capacity_bytes"] <= int(budget):
                self.c["budget_violations"] += 1
        if st["disk"]["evictions"] > self._evictions_seen:  # cannot tell which chunk left: taint all
            self._evictions_seen = st["disk"]["evictions"]
            self.tainted.update(self.shadow)
        for key, slot, want in self.pins:
            if slot >= 0:
                self._same(self.store.host_slab[slot], want)
        for k in self.dropped:
            if self.store.contains(k):
                self.c["mismatches"] += 1
        self.dropped.clear()

    # ------------------------------------------------------------------ ops
    def _keys(self, lo: int = 1, hi: int = 6) -> list[ChunkKey]:
        return self.rng.sample(_KEYS, self.rng.randint(lo, hi))

    def op_write(self) -> None:
        k = self.rng.choice(_KEYS)
        data = torch.randint(0, 256, (_LAYOUT.chunk_bytes,), dtype=torch.uint8, generator=self.gen)
        chunk = data.view(_LAYOUT.dtype).view(_LAYOUT.chunk_shape)
        if self.device == "cuda" and self.rng.random() < 0.3:
            chunk = chunk.cuda()
        try:
            self.store.write(k, chunk)
        except (TransferError, CapacityError):
            self.c["failed_writes"] += 1  # nothing changed: the old version (if any) still stands
            return
        self.shadow[k] = data
        self.tainted.discard(k)

    def op_read(self) -> None:
        keys = self._keys()
        on = self.device if self.rng.random() < 0.5 else "cpu"
        out = torch.empty(len(keys), *_LAYOUT.chunk_shape, dtype=_LAYOUT.dtype, device=on)
        before = sum(self.io.injected.values())
        missed = set(self.store.read(keys, out))
        for i, k in enumerate(keys):
            if k in missed:
                continue
            if k not in self.shadow:
                self.c["mismatches"] += 1  # served a key that was never written or was dropped
            else:
                self._same(out[i], self.shadow[k])
        self._check_missed(keys, missed & set(keys), before)

    def _op_prefetch(self, to: str) -> None:
        keys = list(dict.fromkeys(self._keys(1, 4)))
        before = sum(self.io.injected.values())
        failed = set(self.store.prefetch(keys, to=to).wait(timeout=60))
        slab = self.store.host_slab if to == "host" else self.store.device_slab
        slots = (self.store.host_slots if to == "host" else self.store.device_slots)(keys).tolist()
        for k, s in zip(keys, slots):
            if k in failed:
                continue
            if k not in self.shadow:
                self.c["mismatches"] += 1
            elif s >= 0 and slab is not None:
                self._same(slab[s], self.shadow[k])
        # A prefetch may also fail for room (every slot pinned or in flight): a key still
        # stored was not lost, so only keys that vanished need a fault to explain them.
        self.c["prefetch_failures"] += len(failed & set(self.shadow))  # absent keys fail too: not counted
        self._check_missed(
            keys, {k for k in failed if k in self.shadow and not self.store.contains(k)}, before
        )

    def op_prefetch_host(self) -> None:
        self._op_prefetch("host")

    def op_prefetch_device(self) -> None:
        self._op_prefetch("device")

    def op_pin(self) -> None:
        present = [k for k in _KEYS if k in self.shadow and self.store.contains(k)]
        if len(self.pins) >= 3 or not present:
            return
        k = self.rng.choice(present)
        self.store.pin([k])
        slot = self.store.host_slots([k]).item()
        self.pins.append((k, slot, self.shadow[k]))

    def op_unpin(self) -> None:
        if self.pins:
            # unpin(key) releases that key's oldest pinned version: the first in our list.
            k = self.rng.choice(self.pins)[0]
            self.pins.pop(next(i for i, p in enumerate(self.pins) if p[0] == k))
            self.store.unpin([k])

    def op_drop(self) -> None:
        seq = self.rng.randrange(4)
        self.store.drop(seq)
        gone = {k for k in self.shadow if k.seq_id == seq}
        for k in gone:
            del self.shadow[k]
        self.dropped |= gone
        self.tainted -= gone

    def _release_pins(self) -> None:
        while self.pins:
            self.op_unpin()

    def op_reopen(self) -> None:
        self._release_pins()
        self.io.enabled = False  # a clean close: flushing must not fail on purpose
        self._count_evictions()
        self.store.close()
        self.io.enabled = True
        self.store = TieredStore(_LAYOUT, self.config, io=self.io)
        self._evictions_seen = 0
        self.c["reopens"] += 1
        self._after_reopen(clean=True)

    def op_crash(self) -> None:
        """A writer killed mid-slot during a spill, then the process dies without flushing."""
        self._release_pins()
        self.io.inject("torn_write")
        for _ in range(8):  # enough writes to force a spill of a host-only chunk
            self.op_write()
            if not self.io.pending():
                break
        while self.io.pending():  # no spill happened: drain the queued fault harmlessly
            self.io._take(("torn_write",))
        self._count_evictions()
        self.store._abandon()
        self.store = TieredStore(_LAYOUT, self.config, io=self.io)
        self._evictions_seen = 0
        self.c["crashes"] += 1
        self.c["faults_at_rest"] += 1
        self._after_reopen(clean=False)

    def _count_evictions(self) -> None:
        st = self.store.stats()
        self.c["evictions"] += sum(st[t]["evictions"] for t in ("device", "host", "disk"))

    def _after_reopen(self, *, clean: bool) -> None:
        present = set(self.store.keys())
        for k in list(self.shadow):
            if k not in present:
                if clean and k not in self.tainted:  # a clean close flushes: nothing may go
                    self.c["unexpected_misses"] += 1
                elif not clean:  # host-only chunks die with the process: not a miss
                    self.c["lost_in_crash"] += 1
                del self.shadow[k]
                self.tainted.discard(k)
        for k in present - set(self.shadow):
            self.c["mismatches"] += 1  # a dropped or stale chunk came back

    def op_flip_at_rest(self) -> None:
        on_disk = [k for k in self.shadow if self.store.where(k) == ("disk",)]
        if not on_disk or self.store._disk is None:
            return
        k = self.rng.choice(on_disk)
        slot = self.store._index[k].disk
        assert slot is not None
        path, offset = self.store._disk.locate(slot)
        flip_bit_on_disk(path, offset + self.rng.randrange(_LAYOUT.chunk_bytes), self.rng.randrange(8))
        self.tainted.add(k)
        self.c["faults_at_rest"] += 1

    def step(self) -> str:
        kind = self.rng.choices(list(_OPS), weights=list(_OPS.values()))[0]
        getattr(self, f"op_{kind}")()
        self.ops_by_kind[kind] += 1
        self.c["ops"] += 1
        self._check_invariants()
        return kind

    def close(self) -> None:
        self._release_pins()
        self.io.enabled = False
        self._count_evictions()
        self.store.close()


def stress(
    directory: Path, seconds: float, seed: int = 0, fault_rate: float = 0.02, progress: bool = True
) -> dict[str, Any]:
    """Run the workload for ``seconds`` and return the report (see module docstring)."""
    from tqdm import tqdm

    root = Path(tempfile.mkdtemp(prefix="kvtier-stress-", dir=directory))
    t0 = time.monotonic()
    try:
        s = _Stress(root, seed, fault_rate)
        with tqdm(
            total=round(seconds, 1),
            unit="s",
            disable=not progress,
            desc="kvtier stress",
            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s {postfix}",
        ) as bar:
            last = t0
            while (now := time.monotonic()) - t0 < seconds:
                s.step()
                if now - last > 0.2:
                    bar.update(round(now - last, 1))
                    last = now
                    bar.set_postfix(
                        ops=s.c["ops"],
                        faults=sum(s.io.injected.values()) + s.c["faults_at_rest"],
                        mismatches=s.c["mismatches"],
                    )
        s.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "ops": s.c["ops"],
        "bytes_verified": s.c["bytes_verified"],
        "faults_injected": sum(s.io.injected.values()) + s.c["faults_at_rest"],
        "mismatches": s.c["mismatches"],
        "budget_violations": s.c["budget_violations"],
        "unexpected_misses": s.c["unexpected_misses"],
        "misses": s.c["misses"],
        "failed_writes": s.c["failed_writes"],
        "prefetch_failures": s.c["prefetch_failures"],
        "evictions": s.c["evictions"],
        "reopens": s.c["reopens"],
        "crashes": s.c["crashes"],
        "lost_in_crash": s.c["lost_in_crash"],
        "faults_by_kind": dict(s.io.injected) | {"at_rest": s.c["faults_at_rest"]},
        "ops_by_kind": dict(s.ops_by_kind),
        "seconds": round(time.monotonic() - t0, 2),
        "seed": seed,
        "device": s.device,
    }
    return report


def crash_trials(directory: Path, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Crash trials (:func:`kvtier._crash.crash_trial`) for ``seconds``; their summed counters."""
    root = Path(tempfile.mkdtemp(prefix="kvtier-crash-", dir=directory))
    total: Counter[str] = Counter()
    t0 = time.monotonic()
    trials = 0
    try:
        while time.monotonic() - t0 < seconds:
            trial_dir = root / f"t{trials}"
            total.update(crash_trial(trial_dir, seed * 100_000 + trials))
            shutil.rmtree(trial_dir, ignore_errors=True)
            trials += 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mismatches = total["mismatches_live"] + total["mismatches_reopen"] + total["mismatches_after_crash"]
    return {"trials": trials, "mismatches": mismatches, **dict(sorted(total.items()))}


def process_trials(directory: Path, processes: int, seconds: float, seed: int = 0) -> dict[str, Any]:
    """``processes`` processes contending for one folder (:func:`kvtier._multiproc.run_processes`)."""
    root = Path(tempfile.mkdtemp(prefix="kvtier-procs-", dir=directory))
    try:
        return run_processes(root, processes, seconds, seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``kvtier stress``; exit status 1 if any invariant broke.

    With ``--crash`` and ``--processes`` the ``--seconds`` are shared evenly between the
    random workload and each extra mode.
    """
    if args.processes < 0:
        raise ValueError(f"--processes: expected an int >= 0, got {args.processes}")
    args.dir.mkdir(parents=True, exist_ok=True)
    # Injected faults log a warning each (thousands per run): keep the terminal for the bar.
    logging.getLogger("kvtier").setLevel(logging.ERROR)
    share = args.seconds / (1 + bool(args.crash) + bool(args.processes))
    report = stress(args.dir, share, args.seed, args.fault_rate, progress=not args.no_progress)
    if args.crash:
        report["crash"] = crash_trials(args.dir, share, args.seed)
        report["mismatches"] += report["crash"]["mismatches"]
        print(f"{'crash':>18}: {report['crash']}")
    if args.processes:
        report["processes"] = process_trials(args.dir, args.processes, share, args.seed)
        report["mismatches"] += report["processes"]["mismatches"]
        print(f"{'processes':>18}: {report['processes']}")
    for key in (
        "device",
        "ops",
        "evictions",
        "bytes_verified",
        "faults_injected",
        "mismatches",
        "budget_violations",
        "unexpected_misses",
        "misses",
        "reopens",
        "crashes",
    ):
        print(f"{key:>18}: {report[key]}")
    print(f"{'faults_by_kind':>18}: {report['faults_by_kind']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.json}")
    bad = report["mismatches"] or report["budget_violations"] or report["unexpected_misses"]
    print("FAILED: the store broke an invariant" if bad else "OK: every byte verified, budgets held")
    return 1 if bad else 0
