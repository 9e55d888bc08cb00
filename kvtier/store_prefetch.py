"""Prefetch of :class:`kvtier.TieredStore`: chunks promoted to the host or device tier on its I/O pool.

:class:`_Prefetch` is mixed into the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

import torch

from kvtier.errors import CapacityError, TierUnavailableError, TransferError
from kvtier.tiers.base import ChunkKey
from kvtier.tiers.records import PrefetchHandle, _Entry
from kvtier.tiers.transfer import copy_chunks

log = logging.getLogger("kvtier.store")


class _Prefetch:
    """``prefetch``: disk to host (verified), host to device on the store's copy stream."""

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, keys: Iterable[tuple[int, int, int]], to: str = "host") -> PrefetchHandle:
        """Make chunks resident in the host or device tier, asynchronously.

        Disk reads run on the I/O pool; host-to-device copies run on the store's own CUDA
        stream after an event recorded on the caller's current stream (so a slot being
        reused is never overwritten while earlier kernels may still read it). Keys are
        pinned while their transfer is in flight.

        Parameters
        ----------
        keys : sequence of (seq_id, layer, chunk_idx)
        to : {"host", "device"}

        Returns
        -------
        PrefetchHandle
            ``done()``, ``wait(timeout)``, ``failed_keys()``.
        """
        self._check_open()
        if to not in ("host", "device"):
            raise ValueError(f"to: expected 'host' or 'device', got {to!r}")
        if to == "device" and self._device is None:
            raise TierUnavailableError("prefetch(to='device'): expected a device tier, got gpu_bytes=0")
        ks = list(dict.fromkeys(self._keys(keys)))
        failed: list[ChunkKey] = []
        from_disk: list[_Entry] = []
        from_host: list[_Entry] = []
        with self._lock:
            for k in ks:
                entry = self._index.get(k)
                if entry is None:
                    failed.append(k)
                    self._misses += 1
                elif to == "device" and entry.device is not None:
                    self._hit("device", k)
                elif entry.host is not None:
                    if to == "device":
                        from_host.append(entry)
                    else:
                        self._hit("host", k)
                else:
                    from_disk.append(entry)
            self._hold(from_disk + from_host)
        issued = None
        if to == "device" and self._copy_stream is not None:
            issued = torch.cuda.Event()
            issued.record(torch.cuda.current_stream(self._copy_stream.device))
        futures: list[Future[list[ChunkKey]]] = []
        # e.disk is read without the lock: a corrupt copy found meanwhile may have become None.
        for batch in self._batches(from_disk, lambda e: -1 if e.disk is None else e.disk):
            futures.append(self._pool.submit(self._promote, batch, to, issued, True))
        if from_host:
            futures.append(self._pool.submit(self._promote, from_host, to, issued, False))
        return PrefetchHandle(ks, futures, failed)

    def _batches(self, items: list[Any], disk_slot: Any) -> list[list[Any]]:
        """Split disk work for the I/O pool, in disk-slot order.

        One task per key costs about 0.1 ms of GIL time in submission alone (as much as a
        256 KiB O_DIRECT read), so a task takes up to 16 keys, at least one task per
        thread; consecutive keys let :meth:`DiskTier.read_many` read adjacent slots in one call.
        """
        items = sorted(items, key=disk_slot)
        size = max(1, min(16, -(-len(items) // self.config.io_threads)))
        return [items[i : i + size] for i in range(0, len(items), size)]

    def _promote(self, entries: list[_Entry], to: str, issued: Any, from_disk: bool) -> list[ChunkKey]:
        """Worker: disk to host (verified), then host to device when asked. Unpins at the end."""
        failed: list[ChunkKey] = []
        try:
            todo = entries
            if from_disk:
                failed = self._disk_to_host(entries)
                gone = set(failed)
                todo = [e for e in entries if e.key not in gone]
            if to == "device" and todo:
                failed.extend(self._host_to_device(todo, issued))
        except Exception as exc:  # noqa: BLE001  (a worker must never lose keys silently)
            log.warning("kvtier: prefetch failed: %s", exc)
            failed.extend(e.key for e in entries if e.key not in failed)
        finally:
            with self._lock:
                self._release(entries)
        return failed

    def _disk_to_host(self, entries: list[_Entry]) -> list[ChunkKey]:
        """Read disk-resident entries into fresh host slots; return the keys that failed."""
        failed: list[ChunkKey] = []
        reqs: list[tuple[_Entry, int, int, int]] = []
        with self._lock:
            for entry in entries:
                if entry.host is not None:
                    continue
                if self._index.get(entry.key) is not entry or entry.disk is None:
                    failed.append(entry.key)
                    continue
                try:
                    reqs.append((entry, entry.disk, entry.disk_generation, self._alloc_host()))
                    self._in_transfer["host"] += 1
                except (CapacityError, TransferError) as exc:
                    # Prefetches are hints: with small budgets this happens every step, so a
                    # counter in stats() and a debug line, not a warning each.
                    self._no_room += 1
                    log.debug("kvtier: no host room for %s: %s", tuple(entry.key), exc)
                    failed.append(entry.key)
        oks = self._disk_read_many([(e, slot, gen, self._host.payload(h)) for e, slot, gen, h in reqs])
        with self._lock:
            for (entry, _, _, host_slot), ok in zip(reqs, oks):
                if ok and self._index.get(entry.key) is entry and entry.host is None:
                    entry.host = host_slot
                    self._note_host(entry.key, host_slot)
                    self._policy["host"].touch(entry.key)
                    self._stats["host"].bytes_written += self._cb
                else:
                    self._host.free(host_slot)
                    if not ok:
                        failed.append(entry.key)
            if reqs:
                self._in_transfer["host"] -= len(reqs)
                self._released.notify_all()
        return failed

    def _host_to_device(self, entries: list[_Entry], issued: Any) -> list[ChunkKey]:
        """Copy host slots into fresh device slots (entries are held, so host slots stay put).

        Works in sub-batches of 256 chunks so the bookkeeping of one overlaps the copies of
        the previous (about 5 us of Python per chunk against 4.8 us of PCIe time for a
        256 KiB chunk at 55 GB/s).
        """
        dev = self._device
        assert dev is not None
        failed = [e.key for e in entries if e.host is None]
        # In host-slot order, so consecutive host slots get consecutive device slots.
        ordered = sorted((e for e in entries if e.host is not None), key=lambda e: e.host)  # type: ignore[arg-type, return-value]
        pairs: list[tuple[_Entry, int, int]] = []
        t0 = time.perf_counter()
        stream_ctx = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else None
        if stream_ctx is not None:
            stream_ctx.__enter__()
            self._copy_stream.wait_event(issued)  # type: ignore[union-attr]
        try:
            for start in range(0, len(ordered), 256):
                batch: list[tuple[_Entry, int, int]] = []
                with self._lock:
                    for entry in ordered[start : start + 256]:
                        try:
                            batch.append((entry, entry.host, self._alloc_device()))  # type: ignore[arg-type]
                            self._in_transfer["device"] += 1
                        except CapacityError:
                            failed.append(entry.key)
                pairs.extend(batch)
                copy_chunks(
                    self._host.slab,
                    dev.slab,
                    [(h, d) for _, h, d in batch],
                    group_size=self.layout.group_size,
                )
            if self._copy_stream is not None:
                done = torch.cuda.Event()
                done.record(self._copy_stream)
                done.synchronize()  # in the worker thread: the caller only waits on the handle
        except Exception:
            with self._lock:
                for _, _, dslot in pairs:
                    dev.free(dslot)
                self._in_transfer["device"] -= len(pairs)
                self._released.notify_all()
            raise
        finally:
            if stream_ctx is not None:
                stream_ctx.__exit__(None, None, None)
        elapsed = time.perf_counter() - t0
        with self._lock:
            for entry, _, dslot in pairs:
                if self._index.get(entry.key) is entry and entry.device is None:
                    entry.device = dslot
                    self._policy["device"].touch(entry.key)
                else:
                    dev.free(dslot)
            self._in_transfer["device"] -= len(pairs)
            self._released.notify_all()
            st = self._stats["device"]
            st.bytes_written += len(pairs) * self._cb
            if pairs:
                st.latency_s.append(elapsed / len(pairs))
        return failed
