"""TieredStore: where every K/V chunk is, budgets per tier, promotion, eviction, pinning.

Placement rules (each has a test):

- ``write`` puts a chunk in the host tier. When the host tier is full, the least recently
  used unpinned host chunk leaves; if it has no disk copy it is written to disk first
  (spill). Without a disk tier it is dropped: this is a cache.
- Every stored chunk has a host copy, a disk copy or both; a device copy is only ever a
  cache of one of them, so evicting it never loses data.
- A pinned chunk is never evicted from any tier and its slots never move; overwriting or
  dropping a pinned key retires the pinned version's slots only at its last unpin.
- A disk read that fails (I/O error, short read) or does not verify (checksum, key,
  generation) is a miss reported with its key, never data; a corrupt disk copy is discarded.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

import torch

from kvtier.config import StoreConfig
from kvtier.errors import CapacityError, ConfigError, TierUnavailableError, TransferError
from kvtier.layout import KVLayout
from kvtier.store_prefetch import _Prefetch
from kvtier.store_read import _Reads
from kvtier.tiers._slab import check_chunk
from kvtier.tiers.base import ChunkKey
from kvtier.tiers.device import DeviceTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostTier
from kvtier.tiers.io import IOBackend, make_backend
from kvtier.tiers.policy import EvictionPolicy, make_policy
from kvtier.tiers.records import PrefetchHandle, _Entry, _TierStats

__all__ = ["ChunkKey", "PrefetchHandle", "TieredStore"]

log = logging.getLogger("kvtier.store")

_TIERS = ("device", "host", "disk")
#: How long ``write`` waits for a transfer in flight to release a slot before it raises
#: CapacityError (a 256 KiB disk read takes about 1 ms; 5 s means something is stuck).
_WAIT_S = 5.0
_MAX_ID = 2**63


def _check_device(name: str | None) -> torch.device:
    """The device tier's device: "cpu" or an existing CUDA device."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"StoreConfig.device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}") from exc
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"StoreConfig.device: expected 'cpu' (one CPU device), got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TierUnavailableError(
                f"StoreConfig.device: expected an available device, got {device} without CUDA"
            )
        if device.index is not None and not 0 <= device.index < torch.cuda.device_count():
            raise TierUnavailableError(
                f"StoreConfig.device: expected one of {torch.cuda.device_count()} CUDA devices, got {device}"
            )
    elif device.type != "cpu":
        raise ConfigError(f"StoreConfig.device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


_T = TypeVar("_T")


def _allocate(name: str, nbytes: int, make: Callable[[], _T]) -> _T:
    """Build a tier's slab; an allocation the machine refuses is a ConfigError, not a crash."""
    try:
        return make()
    except (OSError, OverflowError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"StoreConfig.{name}: expected a budget this machine can allocate, got {nbytes} bytes "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ) from exc


class TieredStore(_Reads, _Prefetch):
    """K/V chunks across a device tier, a pinned host tier and a disk tier.

    Parameters
    ----------
    layout : KVLayout
        Geometry of every chunk ``[2, Hkv, C, D]``; the disk tier is bound to its fingerprint.
    config : StoreConfig
        Budgets (``gpu_bytes``, ``host_bytes``, ``disk_bytes``), ``disk_dir`` (None: no disk
        tier), ``io_backend``, ``eviction``, ``device`` and ``io_threads``.
    io : IOBackend, optional
        Replaces the disk backend chosen by ``config.io_backend`` (fault-injection seam).
    pin_host : bool or None
        Forwarded to :class:`HostTier` (None: pin when CUDA is available).
    policy : callable, optional
        Factory of an :class:`~kvtier.tiers.EvictionPolicy`, one instance per tier;
        replaces ``config.eviction`` (the pluggable eviction order).

    Raises
    ------
    ConfigError
        If the host budget (or a non-zero device or disk budget) cannot hold one chunk.
    LayoutMismatchError
        If ``disk_dir`` holds slab files of another layout.

    Examples
    --------
    >>> layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_size=4, group_size=2)
    >>> with TieredStore(layout, StoreConfig(gpu_bytes=0, host_bytes="1KiB")) as store:
    ...     store.write((0, 0, 0), torch.ones(layout.chunk_shape, dtype=torch.float16))
    ...     out = torch.empty(1, *layout.chunk_shape, dtype=torch.float16)
    ...     store.read([(0, 0, 0)], out)
    []
    """

    def __init__(
        self,
        layout: KVLayout,
        config: StoreConfig,
        *,
        io: IOBackend | None = None,
        pin_host: bool | None = None,
        policy: Callable[[], EvictionPolicy] | None = None,
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout: expected a KVLayout, got {type(layout).__name__}")
        if not isinstance(config, StoreConfig):
            raise TypeError(f"config: expected a StoreConfig, got {type(config).__name__}")
        self.layout = layout
        self.config = config
        self._cb = layout.chunk_bytes  # a property that builds a tensor: read it once
        self._num_layers = layout.num_layers
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)  # a chunk's last pin went away
        self._in_transfer: Counter[str] = Counter()  # slots allocated by transfers in flight
        self._closed = False
        device = _check_device(config.device)
        self._host = _allocate("host_bytes", int(config.host_bytes), lambda: HostTier(layout, int(config.host_bytes), pin=pin_host))
        self._device: DeviceTier | None = None
        if int(config.gpu_bytes) > 0:
            if int(config.gpu_bytes) < layout.chunk_bytes:
                raise ConfigError(
                    f"StoreConfig.gpu_bytes: expected 0 or at least one chunk "
                    f"({layout.chunk_bytes} bytes), got {config.gpu_bytes} bytes"
                )
            self._device = _allocate(
                "gpu_bytes", int(config.gpu_bytes), lambda: DeviceTier(layout, int(config.gpu_bytes), device)
            )
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" and self._device else None
        self._disk: DiskTier | None = None
        #: A private folder made because no disk_dir was given; removed at close.
        self._temp_dir: str | None = None
        if int(config.disk_bytes) > 0:
            backend = io if io is not None else make_backend(config.io_backend)
            directory = config.disk_dir
            if directory is None:
                # The default must not fail mid-generation when the host tier fills: spill
                # to a private folder (mkdtemp: mode 0700) instead of dropping chunks.
                self._temp_dir = directory = tempfile.mkdtemp(prefix="kvtier-store-")
                # Also removed when a store that was never closed is collected, or at exit.
                weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
            try:
                self._disk = DiskTier(layout, int(config.disk_bytes), directory, io=backend)
            except BaseException:
                if self._temp_dir is not None:
                    shutil.rmtree(self._temp_dir, ignore_errors=True)
                raise
        self._policy: dict[str, EvictionPolicy] = {
            t: (policy() if policy is not None else make_policy(config.eviction)) for t in _TIERS
        }
        self._index: dict[ChunkKey, _Entry] = {}
        self._by_seq: dict[int, set[ChunkKey]] = {}
        # Pins belong to one version of a key (an entry): overwriting a pinned key makes a
        # new, unpinned version while the pinned one keeps its slots for zero-copy readers.
        # Each pin remembers the thread that took it: unpin releases that thread's oldest
        # pinned version first (a global oldest-first order let one thread's unpin free the
        # slot another thread was still reading).
        self._user_pins: dict[ChunkKey, list[tuple[_Entry, int]]] = {}
        self._stats = {t: _TierStats() for t in _TIERS}
        self._misses = 0
        #: Prefetches that found no host room (pinned or in flight): a counter and a debug
        #: line, not a warning each (small budgets made thousands per generation).
        self._no_room = 0
        #: Chunks that left the store because the host tier was full and there is no disk tier.
        self._dropped = 0
        self._local = threading.local()
        self._host_watchers: list[Callable[[ChunkKey, int], None]] = []  # engine support
        self._host_fences: list[Callable[[], None]] = []  # engine support
        self._pool = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="kvtier-io")
        if self._disk is not None:
            try:
                for rec in sorted(self._disk.scan(), key=lambda r: r.generation):
                    if rec.key.layer >= layout.num_layers:
                        self._disk.free(rec.slot)
                        continue
                    entry = _Entry(rec.key, disk=rec.slot, disk_generation=rec.generation)
                    self._install(entry)
                    self._policy["disk"].touch(rec.key)
            except BaseException:
                self._abandon()  # release the folder's lock: a failed open must not hold it
                if self._temp_dir is not None:
                    shutil.rmtree(self._temp_dir, ignore_errors=True)
                raise

    # ------------------------------------------------------------------ keys
    def _key(self, key: object) -> ChunkKey:
        if (
            type(key) is ChunkKey
            and type(key[0]) is int
            and type(key[1]) is int
            and type(key[2]) is int
            and 0 <= key[0] < _MAX_ID
            and 0 <= key[1] < self._num_layers
            and 0 <= key[2] < _MAX_ID
        ):
            return key  # the common case, about 4x cheaper than the checks below
        if not isinstance(key, tuple) or len(key) != 3:
            raise TypeError(f"key: expected a (seq_id, layer, chunk_idx) tuple, got {type(key).__name__}")
        for name, value in zip(ChunkKey._fields, key):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"key.{name}: expected an int, got {type(value).__name__}")
            if not 0 <= value < _MAX_ID:
                raise ValueError(f"key.{name}: expected an int in [0, 2**63), got {value}")
        if key[1] >= self.layout.num_layers:
            raise ValueError(f"key.layer: expected < num_layers={self.layout.num_layers}, got {key[1]}")
        return key if isinstance(key, ChunkKey) else ChunkKey(*key)

    def _keys(self, keys: Iterable[object]) -> list[ChunkKey]:
        if isinstance(keys, tuple) and len(keys) == 3 and all(isinstance(k, int) for k in keys):
            raise TypeError("keys: expected a sequence of keys, got a single key tuple (wrap it in a list)")
        return [self._key(k) for k in keys]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TieredStore: expected an open store, got a closed one")

    def _check_not_slab(self, name: str, t: torch.Tensor) -> None:
        """Refuse a caller buffer inside one of the store's own slabs.

        A disk read lands straight in the buffer, so a view of another key's host slot
        would overwrite that key's bytes.
        """
        ptr = t.untyped_storage().data_ptr()
        for slab in (self._host.slab, None if self._device is None else self._device.slab):
            if slab is not None and slab.device == t.device and slab.untyped_storage().data_ptr() == ptr:
                raise ValueError(f"{name}: expected a buffer of the caller's own, got a view of the store's slab")

    # ------------------------------------------------------------------ index
    def _install(self, entry: _Entry) -> None:
        self._index[entry.key] = entry
        self._by_seq.setdefault(entry.key.seq_id, set()).add(entry.key)

    def _free_entry(self, entry: _Entry) -> None:
        """Release every slot of an entry that is no longer indexed."""
        if entry.host is not None:
            self._host.free(entry.host)
        if entry.device is not None and self._device is not None:
            self._device.free(entry.device)
        if entry.disk is not None and self._disk is not None:
            self._disk.free(entry.disk)
        entry.host = entry.device = entry.disk = None

    def _unindex(self, entry: _Entry) -> None:
        """Remove a live entry; its slots are freed now, or at the last unpin."""
        key = entry.key
        assert self._index.get(key) is entry, "only live entries are unindexed"
        del self._index[key]
        self._note_host(key, -1)
        seq = self._by_seq[key.seq_id]
        seq.discard(key)
        if not seq:
            del self._by_seq[key.seq_id]
        for policy in self._policy.values():
            policy.remove(key)
        if entry.pins > 0:
            entry.retired = True
        else:
            self._free_entry(entry)

    def _victim(self, tier: str, *, wait: bool = False) -> _Entry:
        """The first unpinned chunk in eviction order (under the lock).

        With ``wait``, if every candidate is pinned but some only by transfers in flight or
        by other threads' pins (which those threads release), wait (up to :data:`_WAIT_S`)
        for one to be released instead of failing at once; pins of the calling thread alone
        fail at once (waiting for them would wait for nothing). Only the caller's thread
        waits: a pool worker that waited could be waiting for a task queued behind itself.
        """
        deadline = None
        me = threading.get_ident()
        while True:
            in_flight = self._in_transfer[tier] > 0  # slots taken by transfers, not yet indexed
            for key in self._policy[tier].candidates():
                entry = self._index[key]  # type: ignore[index]
                if entry.pins == 0:
                    return entry
                if not in_flight:
                    owners = [t for e, t in self._user_pins.get(entry.key, ()) if e is entry]
                    in_flight = entry.pins > len(owners) or any(t != me for t in owners)
            if not (wait and in_flight):
                break
            deadline = time.monotonic() + _WAIT_S if deadline is None else deadline
            if deadline <= time.monotonic():
                break
            self._released.wait(deadline - time.monotonic())
        why = "pinned or in flight" if in_flight else "pinned by this thread"
        raise CapacityError(f"{tier} tier: expected an unpinned chunk to evict, got every used slot {why}")

    def _alloc_host(self, *, wait: bool = False) -> int:
        while self._host.num_free == 0:
            victim = self._victim("host", wait=wait)
            if victim.disk is None and self._disk is not None:
                # The spill may wait for a disk slot, which releases the lock: hold the victim
                # meanwhile, and choose again if another thread pinned, replaced or moved it
                # (freeing its host slot then handed a pinned slot to a new chunk).
                victim.pins += 1
                try:
                    self._spill(victim, wait=wait)  # raises TransferError / CapacityError: the victim stays
                finally:
                    self._release([victim])
                if victim.pins or victim.host is None or self._index.get(victim.key) is not victim:
                    continue
            self._stats["host"].evictions += 1
            self._policy["host"].remove(victim.key)
            self._host.free(victim.host)  # type: ignore[arg-type]
            victim.host = None
            self._note_host(victim.key, -1)
            if victim.disk is None:  # no disk tier: the chunk is gone (device copy too)
                if self._dropped == 0:
                    log.info(
                        "kvtier: host tier full and no disk tier (disk_bytes=0): least recently used "
                        "chunks leave the store (counted in stats()['dropped'])"
                    )
                self._dropped += 1
                log.debug("kvtier: dropped %s (host tier full, no disk tier)", tuple(victim.key))
                self._unindex(victim)
            for fence in self._host_fences:  # a device reader may still read the freed slot
                fence()
        return self._host.allocate()

    def _alloc_disk(self, *, wait: bool = False) -> int:
        assert self._disk is not None
        if self._disk.num_free == 0:
            victim = self._victim("disk", wait=wait)
            self._stats["disk"].evictions += 1
            self._policy["disk"].remove(victim.key)
            if victim.host is None:  # its only copy: the chunk leaves the store
                self._unindex(victim)
            else:
                self._disk.free(victim.disk)  # type: ignore[arg-type]
                victim.disk = None
        return self._disk.allocate()

    def _alloc_device(self) -> int:
        assert self._device is not None
        if self._device.num_free == 0:
            victim = self._victim("device")
            self._stats["device"].evictions += 1
            self._policy["device"].remove(victim.key)
            self._device.free(victim.device)  # type: ignore[arg-type]
            victim.device = None
        return self._device.allocate()

    def _spill(self, entry: _Entry, *, wait: bool = False) -> None:
        """Write a host-only chunk to disk (under the store lock)."""
        assert self._disk is not None and entry.host is not None
        slot = self._alloc_disk(wait=wait)
        t0 = time.perf_counter()
        try:
            generation = self._disk.write(slot, entry.key, self._host.payload(entry.host))
        except TransferError:
            self._disk.free(slot)
            self._stats["disk"].failures += 1
            raise
        self._stats["disk"].bytes_written += self._cb
        self._stats["disk"].latency_s.append(time.perf_counter() - t0)
        entry.disk, entry.disk_generation = slot, generation
        self._policy["disk"].touch(entry.key)

    # ------------------------------------------------------------------ write / drop / pin
    def write(self, key: tuple[int, int, int], chunk: torch.Tensor) -> None:
        """Store one closed chunk in the host tier (spilling older chunks to disk if full).

        Parameters
        ----------
        key : (seq_id, layer, chunk_idx)
            Ints >= 0, ``layer < layout.num_layers``. An existing key is replaced.
        chunk : torch.Tensor
            ``[2, Hkv, C, D]`` (K then V), ``layout.dtype``, contiguous, any device.

        Raises
        ------
        CapacityError
            If every host chunk is pinned (after waiting up to 5 s for transfers in flight
            to release one), or the disk tier has no room for a spill.
        TransferError
            If a spill to disk failed. Either way the store is unchanged: an older version
            of ``key``, if any, is still served.
        """
        self._check_open()
        k = self._key(key)
        check_chunk("chunk", chunk, self.layout)
        with self._lock:
            self._check_open()
            slot = self._alloc_host(wait=True)
            try:
                self._host.write(slot, chunk)
                old = self._index.get(k)
                if self._disk is not None:
                    # A copy of k still valid on disk would come back on reopen (or after a
                    # crash) over this newer version: it is invalidated before the write is
                    # acknowledged; if that fails the write fails and the old version stands.
                    self._disk.retire_key(k)
                    if old is not None and old.disk is not None:
                        self._disk.invalidate(old.disk)
            except BaseException:
                self._host.free(slot)
                raise
            if old is not None:
                self._unindex(old)
            self._install(_Entry(k, host=slot))
            self._note_host(k, slot)
            self._policy["host"].touch(k)
            self._stats["host"].bytes_written += self._cb

    def drop(self, seq_id: int) -> int:
        """Forget every chunk of ``seq_id`` in every tier; return how many were dropped.

        Pinned chunks disappear from lookups at once; their slots are released at the last unpin.

        Raises
        ------
        TransferError
            If the disk copy of a dropped chunk could not be invalidated (its header could
            not be cleared): the chunks are dropped from the store, but one could come back
            after a crash. Clears are retried; :meth:`close` raises if they never succeed.
        """
        self._check_open()
        if isinstance(seq_id, bool) or not isinstance(seq_id, int):
            raise TypeError(f"seq_id: expected an int, got {type(seq_id).__name__}")
        with self._lock:
            keys = list(self._by_seq.get(seq_id, ()))
            failed = 0
            for k in keys:
                entry = self._index[k]
                if entry.disk is not None and self._disk is not None:
                    try:
                        self._disk.invalidate(entry.disk)
                    except TransferError:
                        failed += 1  # the slot keeps its header; retried at later frees and close
                self._unindex(entry)
        if failed:
            raise TransferError(
                f"drop({seq_id}): expected every disk copy invalidated, got {failed} of {len(keys)} "
                f"headers not cleared (I/O error); they are retried, and close() raises if they stay"
            )
        return len(keys)

    def pin(self, keys: Iterable[tuple[int, int, int]]) -> None:
        """Pin the current version of each key: no eviction, stable slots, until :meth:`unpin`.

        Pins nest. Overwriting or dropping a pinned key makes the new state visible at once,
        while the pinned version keeps its slots and bytes until its last unpin (so a
        kernel reading :attr:`host_slab` by slot id never sees them change).

        Raises
        ------
        KeyError
            If a key is not stored (no key is pinned then).
        """
        self._check_open()
        ks = self._keys(keys)
        with self._lock:
            missing = [k for k in ks if k not in self._index]
            if missing:
                raise KeyError(
                    f"pin: expected stored keys, got {len(missing)} missing, first {tuple(missing[0])}"
                )
            entries = [self._index[k] for k in ks]
            self._hold(entries)
            for k, e in zip(ks, entries):
                self._user_pins.setdefault(k, []).append((e, threading.get_ident()))

    def pin_host_slots(self, keys: Iterable[tuple[int, int, int]]) -> torch.Tensor:
        """Pin the current version of each key and return its host slot, atomically.

        The slots are those of exactly the pinned versions: calling :meth:`pin` then
        :meth:`host_slots` could return the slot of a newer version another thread wrote in
        between (unpinned, so its slot may be reused under a zero-copy reader). Release with
        :meth:`unpin` as for :meth:`pin`.

        Returns
        -------
        torch.Tensor
            ``[len(keys)]`` int64 on the CPU: the pinned version's slot in :attr:`host_slab`,
            or -1 where that version has no host copy (disk only: prefetch it to the host
            first, then pin). The bytes at a returned slot do not change until the last unpin.

        Raises
        ------
        KeyError
            If a key is not stored (no key is pinned then).
        """
        ks = self._keys(keys)
        with self._lock:
            self.pin(ks)
            entries = [self._user_pins[k][-1][0] for k in ks]
            return torch.tensor([-1 if e.host is None else e.host for e in entries], dtype=torch.long)

    def unpin(self, keys: Iterable[tuple[int, int, int]]) -> None:
        """Release one pin of each key; retired slots of a key are freed at its last unpin.

        The version released is the oldest one the calling thread pinned (or, if it pinned
        none, the oldest one pinned), so threads pinning the same key never release each
        other's versions.
        """
        self._check_open()
        ks = self._keys(keys)
        with self._lock:
            need = Counter(ks)
            bad = [k for k, n in need.items() if len(self._user_pins.get(k, ())) < n]
            if bad:
                raise ValueError(f"unpin: expected pinned keys, got {tuple(bad[0])} not pinned")
            me = threading.get_ident()
            for k in ks:
                stack = self._user_pins[k]
                mine = next((i for i, (_, owner) in enumerate(stack) if owner == me), 0)
                self._release([stack.pop(mine)[0]])
                if not stack:
                    del self._user_pins[k]

    @staticmethod
    def _hold(entries: Iterable[_Entry]) -> None:
        for e in entries:
            e.pins += 1

    def _release(self, entries: Iterable[_Entry]) -> None:
        freed = False
        for e in entries:
            e.pins -= 1
            assert e.pins >= 0
            if e.pins == 0:
                freed = True
                if e.retired:
                    self._free_entry(e)
        if freed:
            self._released.notify_all()

    # ------------------------------------------------------------------ lookups
    def contains(self, key: tuple[int, int, int]) -> bool:
        """Whether ``key`` is stored in any tier."""
        self._check_open()
        return self._key(key) in self._index

    def where(self, key: tuple[int, int, int]) -> tuple[str, ...]:
        """Tiers holding ``key``, fastest first, e.g. ``("host", "disk")``; ``()`` if absent."""
        self._check_open()
        entry = self._index.get(self._key(key))
        if entry is None:
            return ()
        return tuple(t for t in _TIERS if getattr(entry, t) is not None)

    def __contains__(self, key: object) -> bool:
        return self.contains(key)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[ChunkKey]:
        """Every stored key (a snapshot)."""
        self._check_open()
        with self._lock:
            return list(self._index)

    def _slots(self, keys: Iterable[tuple[int, int, int]], tier: str) -> torch.Tensor:
        self._check_open()
        ks = self._keys(keys)
        with self._lock:
            slots = []
            for k in ks:
                entry = self._index.get(k)
                slot = None if entry is None else getattr(entry, tier)
                slots.append(-1 if slot is None else slot)
        return torch.tensor(slots, dtype=torch.long)

    def host_slots(self, keys: Iterable[tuple[int, int, int]]) -> torch.Tensor:
        """Slot of each key in :attr:`host_slab`, or -1.

        Returns
        -------
        torch.Tensor
            ``[len(keys)]`` int64 on the CPU. Slots of pinned keys stay valid until unpinned.
        """
        return self._slots(keys, "host")

    def device_slots(self, keys: Iterable[tuple[int, int, int]]) -> torch.Tensor:
        """Slot of each key in :attr:`device_slab`, or -1 (``[len(keys)]`` int64, CPU)."""
        return self._slots(keys, "device")

    @property
    def host_slab(self) -> torch.Tensor:
        """Host slab ``[num_host_slots, 2, Hkv, C, D]``, pinned when possible (zero-copy gathers)."""
        return self._host.slab

    @property
    def device_slab(self) -> torch.Tensor | None:
        """Device slab ``[num_device_slots, 2, Hkv, C, D]``, or None with ``gpu_bytes=0``."""
        return None if self._device is None else self._device.slab

    @property
    def capacity_chunks(self) -> int:
        """Most distinct chunks the store can hold at once: host slots plus disk slots."""
        return self._host.num_slots + (0 if self._disk is None else self._disk.num_slots)

    @property
    def host_pinned(self) -> bool:
        """Whether the host slab is pinned."""
        return self._host.pinned

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> int:
        """Write host-only chunks to free disk slots (no eviction); return how many were written.

        Raises
        ------
        TransferError
            If a chunk could not be written (I/O error, full disk), after trying every one.
        """
        self._check_open()
        written, failed, _ = self._flush()
        if failed:
            raise TransferError(f"flush: expected every host-only chunk written, got {failed} failed writes")
        return written

    def sync(self) -> None:
        """A sync point: flush host-only chunks to disk, then make the disk tier durable.

        After it returns, the state of every chunk on disk survives a power loss or an OS
        crash (see docs/storage.md for exactly what survives what). Costs an fsync of every
        slab file and a manifest rename; :meth:`close` does the same.

        Raises
        ------
        TransferError
            If a flush or an fsync failed (the previous sync point stands).
        """
        self._check_open()
        if self._disk is None:
            return
        with self._lock:
            _, failed, _ = self._flush()
            if failed:
                raise TransferError(f"sync: expected every host-only chunk written, got {failed} failed writes")
            self._disk.sync()

    def _flush(self) -> tuple[int, int, int]:
        """(written, failed by an I/O error, left out for want of a free disk slot)."""
        if self._disk is None:
            return 0, 0, 0
        written = failed = no_room = 0
        with self._lock:
            for key in list(self._policy["host"].candidates()):
                entry = self._index.get(key)  # type: ignore[call-overload]
                if entry is None or entry.disk is not None:
                    continue
                if self._disk.num_free == 0:
                    no_room += 1
                    continue
                try:
                    self._spill(entry)
                    written += 1
                except TransferError as exc:
                    failed += 1
                    log.warning("kvtier: flush of %s failed: %s", tuple(key), exc)  # type: ignore[arg-type]
        return written, failed, no_room

    def stats(self) -> dict[str, Any]:
        """Counters per tier and for the store.

        Returns
        -------
        dict
            ``hits``, ``misses``; per tier ("device", "host", "disk"): ``hits``,
            ``bytes_read``, ``bytes_written``, ``evictions``, ``failures``,
            ``read_latency_p50_ms``, ``read_latency_p99_ms``, ``used_bytes``,
            ``capacity_bytes``, ``chunks``; and ``host_pinned``, ``pinned_keys``,
            ``prefetch_no_room`` (prefetched keys that found no host slot), ``dropped``
            (chunks that left a store without a disk tier), ``disk_io`` (backend, direct,
            reason), ``disk_open`` (what opening the disk folder found: ``refused_slots`` by
            reason, ``damaged_files``, ``retired_slots``, ``manifest``, ``index``). The one
            call that still works after :meth:`close` (final counters).
        """
        with self._lock:
            out: dict[str, Any] = {"misses": self._misses}
            tiers = {"device": self._device, "host": self._host, "disk": self._disk}
            for name, tier in tiers.items():
                d = self._stats[name].as_dict()
                d["used_bytes"] = 0 if tier is None else tier.used_bytes
                d["capacity_bytes"] = 0 if tier is None else tier.capacity_bytes
                d["chunks"] = sum(1 for e in self._index.values() if getattr(e, name) is not None)
                out[name] = d
            out["hits"] = sum(out[t]["hits"] for t in _TIERS)
            out["host_pinned"] = self._host.pinned
            out["pinned_keys"] = len(self._user_pins)
            out["prefetch_no_room"] = self._no_room
            out["dropped"] = self._dropped
            if self._disk is not None:
                rep = self._disk.open_report
                out["disk_open"] = {
                    "refused_slots": dict(rep["refused_slots"]),
                    "damaged_files": list(rep["damaged_files"]),
                    "retired_slots": rep["retired_slots"],
                    "manifest": rep["manifest"],
                    "index": rep["index"],
                }
                out["disk_io"] = {
                    "backend": self._disk.io.name,
                    "direct": self._disk.direct,
                    "reason": self._disk.direct_reason,
                }
            return out

    def reset_stats(self) -> None:
        """Zero every counter and latency sample (benchmarks time one phase at a time)."""
        with self._lock:
            self._stats = {t: _TierStats() for t in _TIERS}
            self._misses = 0

    def close(self) -> None:
        """Finish in-flight transfers, flush host-only chunks to disk, close the files.

        The store is closed even when this raises.

        Raises
        ------
        TransferError
            If acknowledged data could not be kept: a host-only chunk whose flush failed
            (I/O error, full disk), or a dropped or overwritten chunk whose disk header
            could not be cleared (it could come back on reopen). Chunks left out only
            because the disk budget is full are logged, not raised: the disk tier is a
            bounded cache.
        """
        if self._closed:
            return
        self._pool.shutdown(wait=True)
        problems: list[str] = []
        try:
            with self._lock:
                self._closed = True
                _, failed, no_room = self._flush()
            if failed:
                problems.append(f"{failed} host-only chunks could not be written to disk")
            if no_room:
                log.warning(
                    "kvtier: close: %d host-only chunks did not fit in the disk budget and are gone", no_room
                )
        finally:
            self._closed = True
            if self._disk is not None:
                try:
                    self._disk.close(clean=True)
                except TransferError as exc:
                    problems.append(str(exc))
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
        if problems:
            raise TransferError(f"close: expected every acknowledged chunk kept, got {'; '.join(problems)}")

    def _abandon(self) -> None:
        """Stop as a killed process would: no flush, no clean-close index (tests, stress)."""
        self._pool.shutdown(wait=True)
        self._closed = True
        if self._disk is not None:
            self._disk.close(clean=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- engine support
    # What kvtier.engine needs to address the host slab by slot from its own tensors: a
    # callback on every host slot change, the lock under which slots are stable, and a fence
    # that device readers of the slab register so a slot freed by eviction is reused only
    # after the reads queued before the eviction have run.
    # Several engines may share one store (TieredCache serves a padded batch with one engine per
    # row): each registers its own watcher and fence, and ignores the sequences it does not own.
    def watch_host_slots(self, callback: Callable[[ChunkKey, int], None]) -> None:
        """Call ``callback(key, slot)`` whenever the host slab slot of a stored key changes.

        ``slot`` is the new slot in :attr:`host_slab`, or -1 when the key left the host tier
        (spilled, evicted, dropped, overwritten). It runs under the store lock (see
        :meth:`host_lock`), on whichever thread changed the slot (I/O workers included), so it
        must be quick and must not call the store. Every watcher sees every key; remove one
        with :meth:`unwatch_host_slots`.
        """
        if not callable(callback):
            raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")
        with self._lock:
            self._host_watchers.append(callback)

    def unwatch_host_slots(self, callback: Callable[[ChunkKey, int], None]) -> None:
        """Stop calling ``callback`` (registered by :meth:`watch_host_slots`; unknown ones are ignored)."""
        with self._lock:
            self._host_watchers = [w for w in self._host_watchers if w != callback]

    def add_host_fence(self, fence: Callable[[], None]) -> None:
        """Call ``fence()`` (under the store lock) before reusing a host slot freed by eviction.

        A reader that queues asynchronous reads of :attr:`host_slab` (a GPU gather) passes a
        function that waits for those reads, e.g. ``event.synchronize``. Every fence runs;
        remove one with :meth:`remove_host_fence`.
        """
        if not callable(fence):
            raise TypeError(f"fence: expected a callable, got {type(fence).__name__}")
        with self._lock:
            self._host_fences.append(fence)

    def remove_host_fence(self, fence: Callable[[], None]) -> None:
        """Stop calling ``fence`` (registered by :meth:`add_host_fence`; unknown ones are ignored)."""
        with self._lock:
            self._host_fences = [f for f in self._host_fences if f != fence]

    def host_lock(self) -> threading.RLock:
        """The store lock: while held, no host slot changes owner (``with store.host_lock(): ...``)."""
        return self._lock

    def _note_host(self, key: ChunkKey, slot: int) -> None:
        for watch in self._host_watchers:
            watch(key, slot)
