"""Bookkeeping records of :class:`kvtier.TieredStore`: where a chunk lives, per-tier
counters, and the handle an asynchronous prefetch returns."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from kvtier.tiers.base import ChunkKey

__all__ = ["PrefetchHandle"]


@dataclass
class _Entry:
    """Where one chunk lives. ``host``/``device``/``disk`` are slot ids or None."""

    key: ChunkKey
    host: int | None = None
    device: int | None = None
    disk: int | None = None
    disk_generation: int = 0
    pins: int = 0
    retired: bool = False  # unindexed while pinned: slots are freed at the last unpin


class PrefetchHandle:
    """Completion of one :meth:`TieredStore.prefetch` call.

    When :meth:`wait` returns, every key not in :meth:`failed_keys` was made resident in
    the requested tier with complete bytes (device copies included). Unpinned chunks can
    be evicted again by later operations, and by later keys of the same call when the
    call asks for more than the tier holds: pin what must stay.
    """

    def __init__(
        self, keys: list[ChunkKey], futures: list[Future[list[ChunkKey]]], failed: list[ChunkKey]
    ) -> None:
        self.keys = keys
        self._futures = futures
        self._failed = list(failed)

    def done(self) -> bool:
        """Whether every transfer has finished (successfully or not)."""
        return all(f.done() for f in self._futures)

    def wait(self, timeout: float | None = None) -> list[ChunkKey]:
        """Block until done; return :meth:`failed_keys`.

        Raises
        ------
        TimeoutError
            If ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in self._futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                f.result(timeout=left)
            except FutureTimeout:
                raise TimeoutError(f"prefetch of {len(self.keys)} keys: not done after {timeout} s") from None
        return self.failed_keys()

    def failed_keys(self) -> list[ChunkKey]:
        """Keys that are missing, or whose transfer failed or did not verify (so far)."""
        failed = list(self._failed)
        for f in self._futures:
            if f.done():
                failed.extend(f.result())
        return failed


class _TierStats:
    """Counters of one tier."""

    def __init__(self) -> None:
        self.hits = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.evictions = 0
        self.failures = 0
        self.latency_s: deque[float] = deque(maxlen=4096)

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latency_s)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else (lambda q: 0.0)
        return {
            "hits": self.hits,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "evictions": self.evictions,
            "failures": self.failures,
            "read_latency_p50_ms": pick(0.5),
            "read_latency_p99_ms": pick(0.99),
        }
