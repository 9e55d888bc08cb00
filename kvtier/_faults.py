"""Fault injection for the disk tier, through its I/O backend (the test seam; ``os`` is never patched).

:class:`FaultyIO` wraps a real backend and, on demand or at random, turns one operation
into a fault: an I/O error, a short read, a bit flipped in transit, a full disk, or a
writer killed mid-slot (part of the payload written, no header). Every injected fault is
counted so tests and ``kvtier stress`` can check that each one surfaced as a reported
failure. :func:`flip_bit_on_disk` and :func:`truncate_file` damage files at rest.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections import Counter, deque
from pathlib import Path

from kvtier.tiers.io import IOBackend, PosixIO, Reader

__all__ = [
    "CALLS", "READ_FAULTS", "WRITE_FAULTS", "FaultyIO", "Killed", "VolatileIO", "flip_bit_on_disk", "truncate_file",
]

#: Faults of the read path: each makes one slot read fail (a reported miss).
READ_FAULTS = ("read_error", "short_read", "bitflip_read")
#: Faults of the write path: each makes one payload write fail (a raised TransferError).
WRITE_FAULTS = ("write_error", "disk_full", "torn_write")
#: Backend calls :meth:`FaultyIO.fail_calls` can fail; "pwrite_header" is a pwrite of one
#: 4 KiB header block (a slot header or a header clear).
CALLS = (
    "open_rw", "open_reader", "create", "rename", "unlink", "truncate", "sync_dir",
    "pread", "pwrite", "pwrite_header", "reserve", "sync", "readv",
)


class _FaultyReader:
    def __init__(self, inner: Reader, owner: FaultyIO) -> None:
        self._inner = inner
        self._owner = owner
        self.direct = inner.direct
        self.reason = inner.reason

    def readv(self, buffers: list[memoryview], offset: int) -> int:
        self._owner._call("readv")
        if self._owner.read_delay_s:
            time.sleep(self._owner.read_delay_s)  # a slow disk: transfers stay in flight
        fault = self._owner._take(READ_FAULTS)
        if fault == "read_error":
            raise OSError(errno.EIO, "injected read error")
        got = self._inner.readv(buffers, offset)
        if fault == "short_read":
            return max(0, got - 512)
        if fault == "bitflip_read":
            first = buffers[0].cast("B")
            # Within the payload: a flip in the zero padding after it would change no data.
            i = self._owner._rng.randrange(min(len(first), self._owner.payload_bytes or len(first)))
            first[i] ^= 1 << self._owner._rng.randrange(8)
        return got

    def close(self) -> None:
        self._inner.close()


class FaultyIO:
    """An :class:`~kvtier.tiers.io.IOBackend` that injects faults into a real one.

    Parameters
    ----------
    inner : IOBackend, optional
        The backend doing the real I/O (default :class:`PosixIO`).
    payload_bytes : int, optional
        Write faults hit only writes of exactly this many bytes (the chunk payloads), so
        header writes and clears stay reliable. None: every write may fault.
    rates : dict of str to float, optional
        Probability per operation of each fault in :data:`READ_FAULTS` and
        :data:`WRITE_FAULTS`, for random workloads.
    seed : int
        Seed of the random faults and of the flipped bit positions.

    Attributes
    ----------
    injected : collections.Counter
        Faults injected so far, by name.
    """

    def __init__(
        self,
        inner: IOBackend | None = None,
        *,
        payload_bytes: int | None = None,
        rates: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.inner: IOBackend = inner if inner is not None else PosixIO()
        self.name = f"faulty-{self.inner.name}"
        self.payload_bytes = payload_bytes
        unknown = set(rates or {}) - set(READ_FAULTS) - set(WRITE_FAULTS)
        if unknown:
            raise ValueError(
                f"rates: expected faults from {READ_FAULTS + WRITE_FAULTS}, got {sorted(unknown)}"
            )
        self.rates = dict(rates or {})
        self.injected: Counter[str] = Counter()
        self._queue: deque[str] = deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.enabled = True
        #: Seconds each slot read sleeps before reading (a slow disk, for concurrency tests).
        self.read_delay_s = 0.0
        #: Backend calls made so far, by name (see :data:`CALLS`).
        self.calls: Counter[str] = Counter()
        self._fail: dict[str, list[int]] = {}  # call -> [calls left to fail, errno]

    def fail_calls(self, call: str, count: int = 1, err: int = errno.EIO) -> None:
        """Make the next ``count`` calls of ``call`` raise ``OSError(err)`` (any call, not
        only payload writes: a full disk fails header writes and clears too)."""
        if call not in CALLS:
            raise ValueError(f"call: expected one of {CALLS}, got {call!r}")
        with self._lock:
            self._fail[call] = [count, err]

    def _call(self, call: str) -> None:
        """Count one backend call; raise when it was told to fail."""
        with self._lock:
            self.calls[call] += 1
            left = self._fail.get(call)
            if left is None or left[0] <= 0 or not self.enabled:
                return
            left[0] -= 1
            self.injected[f"{call}_fail"] += 1
            err = left[1]
        raise OSError(err, f"injected {os.strerror(err)} in {call}")

    def inject(self, fault: str, count: int = 1) -> None:
        """Make the next ``count`` operations of the fault's kind fail with ``fault``."""
        if fault not in READ_FAULTS + WRITE_FAULTS:
            raise ValueError(f"fault: expected one of {READ_FAULTS + WRITE_FAULTS}, got {fault!r}")
        with self._lock:
            self._queue.extend([fault] * count)

    def pending(self) -> int:
        """Queued faults not injected yet."""
        return len(self._queue)

    def _take(self, kinds: tuple[str, ...]) -> str | None:
        with self._lock:
            if not self.enabled:
                return None
            for i, fault in enumerate(self._queue):
                if fault in kinds:
                    del self._queue[i]
                    self.injected[fault] += 1
                    return fault
            for fault in kinds:
                if self._rng.random() < self.rates.get(fault, 0.0):
                    self.injected[fault] += 1
                    return fault
        return None

    # ----- IOBackend
    def open_rw(self, path: str) -> int:
        self._call("open_rw")
        return self.inner.open_rw(path)

    def open_reader(self, path: str) -> Reader:
        self._call("open_reader")
        return _FaultyReader(self.inner.open_reader(path), self)

    def pread(self, fd: int, nbytes: int, offset: int) -> bytes:
        self._call("pread")
        return self.inner.pread(fd, nbytes, offset)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        self._call("pwrite")
        if data.nbytes == 4096:
            self._call("pwrite_header")
        if self.payload_bytes is None or data.nbytes == self.payload_bytes:
            fault = self._take(("write_error", "torn_write"))
            if fault == "write_error":
                raise OSError(errno.EIO, "injected write error")
            if fault == "torn_write":
                # The writer dies after half the payload: no header is ever written.
                self.inner.pwrite(fd, data[: data.nbytes // 2], offset)
                raise OSError(errno.EIO, "injected torn write (writer killed mid-slot)")
        return self.inner.pwrite(fd, data, offset)

    def reserve(self, fd: int, offset: int, length: int) -> None:
        self._call("reserve")
        if self._take(("disk_full",)):
            raise OSError(errno.ENOSPC, "injected: no space left on device")
        self.inner.reserve(fd, offset, length)

    def sync(self, fd: int) -> None:
        self._call("sync")
        self.inner.sync(fd)

    def create(self, path: str) -> int:
        self._call("create")
        return self.inner.create(path)

    def rename(self, src: str, dst: str) -> None:
        self._call("rename")
        self.inner.rename(src, dst)

    def unlink(self, path: str) -> None:
        self._call("unlink")
        self.inner.unlink(path)

    def truncate(self, fd: int, size: int) -> None:
        self._call("truncate")
        self.inner.truncate(fd, size)

    def sync_dir(self, path: str) -> None:
        self._call("sync_dir")
        self.inner.sync_dir(path)

    def boot_id(self) -> str:
        return self.inner.boot_id()

    def close(self, fd: int) -> None:
        self.inner.close(fd)


def flip_bit_on_disk(path: str | Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of a file at rest (bit rot), bypassing kvtier entirely."""
    fd = os.open(str(path), os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        if len(byte) != 1:
            raise ValueError(f"offset: expected < file size, got {offset}")
        os.pwrite(fd, bytes([byte[0] ^ (1 << bit)]), offset)
    finally:
        os.close(fd)


def truncate_file(path: str | Path, size: int) -> None:
    """Cut a file to ``size`` bytes (a crash before the filesystem grew it)."""
    os.truncate(str(path), size)


class Killed(BaseException):
    """The simulated process died at a kill point (BaseException: no handler may swallow it)."""


class VolatileIO:
    """An :class:`~kvtier.tiers.io.IOBackend` with a simulated page cache, for crash tests.

    Every write reaches the real file at once (as the page cache would), and is also
    remembered until it is made durable: data writes until an ``fsync`` of their file,
    creations, renames and removals until an ``fsync`` of the folder. Then:

    - :meth:`process_crash`: the process dies, the kernel keeps its page cache: every write
      survives.
    - :meth:`power_loss`: the machine loses power: each 4 KiB page written since its file's
      last fsync keeps one of its versions since then, independently (writes are reordered),
      and a prefix of the folder operations since the last folder fsync survives (journaled
      filesystems keep their order); the boot id changes.
    - :meth:`kill_after`: the process dies inside the store, after ``n`` more backend
      calls: every later call raises :class:`Killed`.

    Parameters
    ----------
    seed : int
        Seed of which pages and folder operations survive a power loss.
    """

    name = "volatile"

    def __init__(self, seed: int = 0) -> None:
        self.inner = PosixIO(direct=False)
        self._rng = random.Random(seed)
        self._ino_path: dict[int, str] = {}  # inode -> current path
        self._fd_ino: dict[int, int] = {}
        self._pages: list[tuple[int, int, bytes]] = []  # (inode, offset, old bytes) not durable
        self._meta: list[tuple[str, str, str | None]] = []  # (op, path, backup or source)
        self._boot = 0
        self._kill_in: int | None = None
        self.calls = 0
        self.lost_pages = 0

    # ----- crash control
    def kill_after(self, n: int) -> None:
        """Die inside the store after ``n`` more backend calls."""
        self._kill_in = n

    def _tick(self) -> None:
        self.calls += 1
        if self._kill_in is not None:
            if self._kill_in <= 0:
                raise Killed("simulated process death at a kill point")
            self._kill_in -= 1

    def process_crash(self) -> None:
        """The process died; the page cache is written back eventually: nothing is lost."""
        self._kill_in = None
        self._pages.clear()
        self._settle(self._meta)

    @staticmethod
    def _settle(ops: list[tuple[str, str, str | None]]) -> None:
        """Folder operations made durable: their undo copies go."""
        for _, path, _ in ops:
            if os.path.lexists(path + ".crashbak"):
                os.unlink(path + ".crashbak")
        ops.clear()

    def power_loss(self) -> None:
        """Lose what was not made durable (see the class docstring); a new boot id."""
        self._kill_in = None
        for ino, offset, old in reversed(self._pages):
            if self._rng.random() < 0.5:
                path = self._ino_path.get(ino)
                if path is not None and os.path.exists(path):
                    fd = os.open(path, os.O_RDWR)
                    try:
                        os.pwrite(fd, old, offset)
                    finally:
                        os.close(fd)
                    self.lost_pages += 1
        self._pages.clear()
        keep = self._rng.randint(0, len(self._meta))
        for op, path, other in reversed(self._meta[keep:]):
            if op == "create" and os.path.exists(path):
                os.unlink(path)
            elif op == "rename":  # path was renamed from other (its old content kept in path.crashbak)
                assert other is not None
                if os.path.exists(path):
                    os.rename(path, other)
                if os.path.exists(path + ".crashbak"):
                    os.rename(path + ".crashbak", path)
            elif op == "unlink" and os.path.exists(path + ".crashbak"):
                os.rename(path + ".crashbak", path)
        self._settle(self._meta)
        self._boot += 1

    # ----- IOBackend
    def _track(self, fd: int, path: str) -> int:
        ino = os.fstat(fd).st_ino
        self._fd_ino[fd] = ino
        self._ino_path[ino] = path
        return fd

    def open_rw(self, path: str) -> int:
        self._tick()
        return self._track(self.inner.open_rw(path), path)

    def open_reader(self, path: str) -> Reader:
        self._tick()
        return self.inner.open_reader(path)

    def create(self, path: str) -> int:
        self._tick()
        fd = self._track(self.inner.create(path), path)
        self._meta.append(("create", path, None))
        return fd

    def rename(self, src: str, dst: str) -> None:
        self._tick()
        if os.path.exists(dst) and not os.path.lexists(dst + ".crashbak"):
            os.link(dst, dst + ".crashbak")
        self.inner.rename(src, dst)
        for ino, p in self._ino_path.items():
            if p == src:
                self._ino_path[ino] = dst
        self._meta.append(("rename", dst, src))

    def unlink(self, path: str) -> None:
        self._tick()
        if not os.path.lexists(path + ".crashbak"):
            os.link(path, path + ".crashbak")
        self.inner.unlink(path)
        self._meta.append(("unlink", path, None))

    def truncate(self, fd: int, size: int) -> None:
        self._tick()
        tail = os.pread(fd, os.fstat(fd).st_size - size, size) if os.fstat(fd).st_size > size else b""
        if tail:
            self._pages.append((self._fd_ino[fd], size, tail))
        self.inner.truncate(fd, size)

    def pread(self, fd: int, nbytes: int, offset: int) -> bytes:
        self._tick()
        return self.inner.pread(fd, nbytes, offset)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        self._tick()
        ino = self._fd_ino[fd]
        size = data.nbytes
        old = os.pread(fd, size, offset)
        old = old + bytes(size - len(old))  # past the end: a lost write reads as zeros
        for start in range(0, size, 4096):
            self._pages.append((ino, offset + start, old[start : start + 4096]))
        return self.inner.pwrite(fd, data, offset)

    def reserve(self, fd: int, offset: int, length: int) -> None:
        self._tick()
        self.inner.reserve(fd, offset, length)

    def sync(self, fd: int) -> None:
        self._tick()
        self.inner.sync(fd)
        ino = self._fd_ino[fd]
        self._pages = [p for p in self._pages if p[0] != ino]

    def sync_dir(self, path: str) -> None:
        self._tick()
        self.inner.sync_dir(path)
        self._settle(self._meta)

    def close(self, fd: int) -> None:
        self.inner.close(fd)  # never a kill point: a dead process's files close anyway
        self._fd_ino.pop(fd, None)

    def boot_id(self) -> str:
        return f"volatile-boot-{self._boot}"
