"""Reads of :class:`kvtier.TieredStore`: chunks copied into caller buffers from the fastest tier.

:class:`_Reads` is mixed into the store; disk reads verify each chunk and count failures (see
the placement rules in :mod:`kvtier.store`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import torch

from kvtier.errors import CorruptChunkError
from kvtier.tiers._slab import check_chunk
from kvtier.tiers.base import ChunkKey, aligned_empty
from kvtier.tiers.records import _Entry

log = logging.getLogger("kvtier.store")


class _Reads:
    """``read`` and the disk reads it shares with prefetch, on the store's index, tiers and pool."""

    # ------------------------------------------------------------------ reads
    def _staging(self) -> torch.Tensor:
        """Per-thread page-aligned (pinned when possible) buffer of one chunk."""
        buf = getattr(self._local, "staging", None)
        if buf is None:
            buf, _ = aligned_empty(self._cb, pin=torch.cuda.is_available())
            self._local.staging = buf
        return buf

    def _disk_read_many(self, reqs: list[tuple[_Entry, int, int, torch.Tensor]]) -> list[bool]:
        """Read disk slots into CPU uint8 buffers ``[chunk_bytes]``; count failures and
        discard corrupt copies. Returns one success flag per request."""
        assert self._disk is not None
        t0 = time.perf_counter()
        errors = self._disk.read_many([(slot, e.key, gen, out) for e, slot, gen, out in reqs])
        # Service time per chunk: a run of adjacent slots is one call, so the call's time
        # is shared among its chunks.
        per_chunk = (time.perf_counter() - t0) / max(1, len(reqs))
        oks = []
        with self._lock:
            st = self._stats["disk"]
            for (entry, slot, _, _), exc in zip(reqs, errors):
                live = self._index.get(entry.key) is entry
                if exc is None:
                    st.hits += 1
                    st.bytes_read += self._cb
                    st.latency_s.append(per_chunk)
                    if live:
                        self._policy["disk"].touch(entry.key)
                    oks.append(True)
                    continue
                oks.append(False)
                if not live and isinstance(exc, CorruptChunkError):
                    # Replaced or dropped while in flight: its header was cleared on purpose.
                    log.debug("kvtier: %s (the chunk was replaced meanwhile)", exc)
                    continue
                log.warning("kvtier: %s", exc)
                st.failures += 1
                if isinstance(exc, CorruptChunkError) and live and entry.disk == slot:
                    # Discard the corrupt copy. A reader still in flight on this slot fails
                    # its own generation check if the slot is reused, so freeing is safe.
                    if entry.host is None:
                        self._unindex(entry)
                    else:
                        self._policy["disk"].remove(entry.key)
                        self._disk.free(slot)
                        entry.disk = None
        return oks

    def _check_out(
        self, keys: list[ChunkKey], out: torch.Tensor | Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if isinstance(out, torch.Tensor):
            if out.dim() != 5 or tuple(out.shape[1:]) != self.layout.chunk_shape or out.shape[0] != len(keys):
                raise ValueError(
                    f"out: expected shape [{len(keys)}, {', '.join(map(str, self.layout.chunk_shape))}] "
                    f"[num_keys, 2, Hkv, C, D], got {list(out.shape)}"
                )
            if out.dtype != self.layout.dtype:
                raise TypeError(f"out: expected dtype {self.layout.dtype}, got {out.dtype}")
            if not out.is_contiguous():
                raise ValueError(f"out: expected a contiguous tensor, got strides {out.stride()}")
            self._check_buffer("out", out)
            return list(out.unbind(0))
        outs = list(out)
        if len(outs) != len(keys):
            raise ValueError(f"out: expected {len(keys)} buffers, got {len(outs)}")
        for i, t in enumerate(outs):
            check_chunk(f"out[{i}]", t, self.layout)
            self._check_buffer(f"out[{i}]", t)
        return outs

    def _check_buffer(self, name: str, t: torch.Tensor) -> None:
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {t.device}")
        if t.requires_grad:
            raise ValueError(f"{name}: expected a buffer that does not require grad, got requires_grad=True")
        self._check_not_slab(name, t)

    def read(
        self, keys: Iterable[tuple[int, int, int]], out: torch.Tensor | Sequence[torch.Tensor]
    ) -> list[ChunkKey]:
        """Copy chunks into caller-owned buffers, from the fastest tier holding each.

        Disk reads run in parallel on the I/O pool; nothing is promoted between tiers
        (use :meth:`prefetch` for that).

        Parameters
        ----------
        keys : sequence of (seq_id, layer, chunk_idx)
        out : torch.Tensor or sequence of torch.Tensor
            ``[len(keys), 2, Hkv, C, D]`` contiguous, or one contiguous ``[2, Hkv, C, D]``
            per key; ``layout.dtype``, any device.

        Returns
        -------
        list of ChunkKey
            Missed keys: absent, or a disk read that failed or did not verify. Their ``out``
            buffers hold undefined bytes. Never raises for a miss.
        """
        self._check_open()
        ks = self._keys(keys)
        return self._read(ks, self._check_out(ks, out), attempts=3)

    def _read(self, ks: list[ChunkKey], outs: list[torch.Tensor], attempts: int) -> list[ChunkKey]:
        missed: list[ChunkKey] = []
        from_disk: list[tuple[_Entry, int, int, torch.Tensor]] = []
        on_gpu = any(o.device.type == "cuda" for o in outs)
        held: list[_Entry] = []
        with self._lock:
            for k, o in zip(ks, outs):
                entry = self._index.get(k)
                if entry is None:
                    missed.append(k)
                    self._misses += 1
                    continue
                dev = self._device
                if entry.device is not None and dev is not None and o.device == dev.device:
                    o.copy_(dev.slab[entry.device])
                    self._hit("device", k)
                    held.append(entry)
                elif entry.host is not None:
                    o.copy_(self._host.slab[entry.host], non_blocking=True)
                    self._hit("host", k)
                    held.append(entry)
                else:
                    assert entry.disk is not None
                    held.append(entry)
                    from_disk.append((entry, entry.disk, entry.disk_generation, o))
            self._hold(held)  # slots stay put while copies and disk reads are in flight
        try:
            futures = [
                self._pool.submit(self._read_batch, b) for b in self._batches(from_disk, lambda r: r[1])
            ]
            if on_gpu:
                torch.cuda.current_stream().synchronize()
            failed: set[ChunkKey] = set()
            for fut in futures:
                failed.update(fut.result())
        finally:
            with self._lock:
                self._release(held)
        if failed:
            # A key overwritten or dropped while its old disk copy was being read fails
            # that read (the old header is cleared before the new version is acknowledged):
            # read the key's current state again rather than report a miss it does not have.
            with self._lock:
                again = [
                    (e.key, o)
                    for e, _, _, o in from_disk
                    if e.key in failed and self._index.get(e.key) is not e and attempts > 1
                ]
            again_keys = {k for k, _ in again}
            lost = [e.key for e, _, _, _ in from_disk if e.key in failed and e.key not in again_keys]
            with self._lock:
                self._misses += len(lost)
            missed.extend(lost)
            if again:
                missed.extend(self._read([k for k, _ in again], [o for _, o in again], attempts - 1))
        return missed

    def _hit(self, tier: str, key: ChunkKey) -> None:
        st = self._stats[tier]
        st.hits += 1
        st.bytes_read += self._cb
        self._policy[tier].touch(key)

    def _read_batch(self, batch: list[tuple[_Entry, int, int, torch.Tensor]]) -> list[ChunkKey]:
        """Worker: disk reads into caller buffers; return the keys that failed."""
        cpu = [
            (e, slot, gen, out.view(-1).view(torch.uint8)) for e, slot, gen, out in batch if not out.is_cuda
        ]
        failed = [req[0].key for req, ok in zip(cpu, self._disk_read_many(cpu)) if not ok]
        for e, slot, gen, out in batch:
            if out.is_cuda:  # through a pinned staging buffer: checksums are verified on the host
                staging = self._staging()
                if self._disk_read_many([(e, slot, gen, staging)])[0]:
                    out.copy_(staging.view(self.layout.dtype).view(self.layout.chunk_shape))
                else:
                    failed.append(e.key)
        return failed
