"""Disk I/O backends of the disk tier: POSIX (O_DIRECT where allowed) and kvikio.

The backend object is the disk tier's only door to the operating system, which makes it
the test seam for fault injection (:mod:`kvtier._faults` wraps one): tests never
monkeypatch ``os``. Writes always go through buffered POSIX ``pwrite`` (this is a cache:
no fsync on the hot path, a crash is caught by the slot checksum); reads go through a
per-file :class:`Reader`.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Protocol

import numpy as np
import torch

from kvtier.errors import TierUnavailableError
from kvtier.tiers.base import PAGE_BYTES, aligned_empty

__all__ = ["IOBackend", "KvikioIO", "PosixIO", "Reader", "kvikio_status", "make_backend"]

log = logging.getLogger("kvtier.tiers")


class Reader(Protocol):
    """Reads of one slab file. ``direct`` says whether reads bypass the page cache."""

    direct: bool
    reason: str

    def readv(self, buffers: list[memoryview], offset: int) -> int:
        """Fill ``buffers`` in order from file ``offset``; return the bytes read."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


class IOBackend(Protocol):
    """What the disk tier needs from the operating system."""

    name: str

    def open_rw(self, path: str) -> int:
        """Open an existing file for buffered writes and header scans (never through a
        symlink); return an fd."""
        ...

    def create(self, path: str) -> int:
        """Create a new file, mode 0600, failing if anything (a symlink too) is at ``path``."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` over ``dst`` (a symlink at ``dst`` is replaced, not followed)."""
        ...

    def unlink(self, path: str) -> None:
        """Remove a file."""
        ...

    def truncate(self, fd: int, size: int) -> None:
        """Cut a file to ``size`` bytes."""
        ...

    def sync_dir(self, path: str) -> None:
        """Make the folder's entries (creations, renames) durable."""
        ...

    def boot_id(self) -> str:
        """An id of the running kernel boot ("" if unknown): writes not made durable may be
        lost only when it changed."""
        ...

    def open_reader(self, path: str) -> Reader:
        """A reader of the slab file at ``path`` (O_DIRECT when possible)."""
        ...

    def pread(self, fd: int, nbytes: int, offset: int) -> bytes:
        """Buffered read of up to ``nbytes`` bytes (header scans only)."""
        ...

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        """Buffered write; return the bytes written."""
        ...

    def reserve(self, fd: int, offset: int, length: int) -> None:
        """Reserve disk blocks for ``[offset, offset + length)`` (ENOSPC surfaces here)."""
        ...

    def sync(self, fd: int) -> None:
        """Flush a file's dirty pages to disk (benchmarks, close)."""
        ...

    def close(self, fd: int) -> None:
        """Close an fd from :meth:`open_rw`."""
        ...


class _PosixReader:
    """O_DIRECT reader, probed once; falls back to buffered reads and says why."""

    def __init__(self, path: str, *, direct: bool) -> None:
        self.direct = False
        self.reason = "O_DIRECT not requested"
        self._fd = -1
        if direct and not hasattr(os, "O_DIRECT"):
            self.reason = "O_DIRECT is not available on this platform"
        elif direct:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                self.reason = f"O_DIRECT open refused ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
            else:
                # tmpfs and some FUSE filesystems accept the flag on open and refuse the read.
                probe, _ = aligned_empty(PAGE_BYTES, pin=False)
                try:
                    os.preadv(fd, [memoryview(probe.numpy())], 0)
                except OSError as exc:
                    os.close(fd)
                    self.reason = f"O_DIRECT read refused ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
                else:
                    self._fd, self.direct, self.reason = fd, True, "O_DIRECT"
        if self._fd < 0:
            self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def readv(self, buffers: list[memoryview], offset: int) -> int:
        return os.preadv(self._fd, buffers, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PosixIO:
    """Plain POSIX I/O: ``preadv`` with O_DIRECT into page-aligned buffers, buffered ``pwrite``.

    Parameters
    ----------
    direct : bool
        Try O_DIRECT for reads (default True). Reads fall back to the page cache, with the
        reason in ``Reader.reason``, where the filesystem refuses it (tmpfs, some FUSE).
    """

    name = "posix"

    def __init__(self, *, direct: bool = True) -> None:
        self._direct = direct

    def open_rw(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)

    def create(self, path: str) -> int:
        # O_EXCL with O_CREAT refuses any existing entry, a dangling symlink included: the
        # store never writes through a link someone planted.
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def boot_id(self) -> str:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                return f.read().strip()
        except OSError:  # not Linux: assume every open may follow a reboot
            return ""

    def open_reader(self, path: str) -> Reader:
        return _PosixReader(path, direct=self._direct)

    def pread(self, fd: int, nbytes: int, offset: int) -> bytes:
        return os.pread(fd, nbytes, offset)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def reserve(self, fd: int, offset: int, length: int) -> None:
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            if os.fstat(fd).st_size < offset + length:  # no fallocate here: extend sparsely
                os.ftruncate(fd, offset + length)

    def sync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)


def kvikio_status() -> dict[str, object]:
    """Whether kvikio imports and works, and whether it runs GPUDirect Storage or compat mode.

    Returns
    -------
    dict
        ``available`` (bool), ``version``, ``mode`` ("gds", "compat" or "unavailable") and
        ``reason``.
    """
    try:
        import kvikio
        import kvikio.defaults
    except Exception as exc:  # noqa: BLE001  (ImportError, or a missing libcuda raising OSError)
        return {"available": False, "version": None, "mode": "unavailable", "reason": f"import kvikio: {exc}"}
    if not torch.cuda.is_available():
        # Without libcuda every kvikio read fails (platform.md); do not pretend.
        return {
            "available": False,
            "version": getattr(kvikio, "__version__", "?"),
            "mode": "unavailable",
            "reason": "no CUDA device",
        }
    compat: object = None
    for probe in ("is_compat_mode_preferred", "compat_mode"):
        fn = getattr(kvikio.defaults, probe, None)
        if callable(fn):
            try:
                compat = fn()
                break
            except Exception:  # noqa: BLE001, S112  (an API that moved between kvikio releases)
                continue
    if compat is None and hasattr(kvikio.defaults, "get"):
        try:
            compat = kvikio.defaults.get("compat_mode")
        except Exception:  # noqa: BLE001  (older kvikio: no such key)
            compat = None
    on = str(compat).upper()
    is_compat = compat is True or on.endswith("ON") or on == "TRUE"
    if not is_compat:
        # AUTO resolves to compat when nvidia-fs cannot register files; ask the driver.
        try:
            import kvikio.cufile_driver

            props = kvikio.cufile_driver.DriverProperties()
            is_compat = not bool(getattr(props, "is_gds_available", False))
        except Exception:  # noqa: BLE001  (no driver: compatibility mode)
            is_compat = True
    return {
        "available": True,
        "version": getattr(kvikio, "__version__", "?"),
        "mode": "compat" if is_compat else "gds",
        "reason": f"compat_mode={compat}",
    }


class _KvikioReader:
    """kvikio ``CuFile`` reads into host buffers (checksums are verified on the host)."""

    def __init__(self, path: str, mode: str) -> None:
        import kvikio

        self._file = kvikio.CuFile(path, "r")
        self.direct = mode == "gds"
        self.reason = f"kvikio {mode} mode"

    def readv(self, buffers: list[memoryview], offset: int) -> int:
        futures = []
        pos = offset
        for buf in buffers:
            arr = np.asarray(buf)  # kvikio takes array-likes; a numpy view of the same memory
            futures.append(self._file.pread(arr, buf.nbytes, pos))
            pos += buf.nbytes
        return int(sum(f.get() for f in futures))

    def close(self) -> None:
        self._file.close()


class KvikioIO(PosixIO):
    """kvikio reads (GPUDirect Storage, or its POSIX compatibility mode); POSIX writes.

    Raises
    ------
    TierUnavailableError
        If kvikio is not installed or no CUDA device is present.
    """

    name = "kvikio"

    def __init__(self) -> None:
        super().__init__(direct=False)
        self.status = kvikio_status()
        if not self.status["available"]:
            raise TierUnavailableError(
                f"io_backend='kvikio': expected a working kvikio, got {self.status['reason']}"
            )
        if self.status["mode"] != "gds":
            log.warning(
                "kvtier: kvikio runs in compatibility mode (no GPUDirect Storage): reads go through POSIX"
            )

    def open_reader(self, path: str) -> Reader:
        return _KvikioReader(path, str(self.status["mode"]))


def make_backend(name: str) -> IOBackend:
    """The backend for ``StoreConfig.io_backend``: "auto" is kvikio with GPUDirect Storage, else POSIX."""
    if name == "posix":
        return PosixIO()
    if name == "kvikio":
        return KvikioIO()
    if name == "auto":
        # kvikio only when it really does GPUDirect Storage: in compatibility mode it is
        # POSIX I/O behind another layer, and kvtier's own O_DIRECT path is first-class.
        status = (
            kvikio_status() if torch.cuda.is_available() else {"mode": "unavailable", "reason": "no CUDA"}
        )
        if status["mode"] == "gds":
            return KvikioIO()
        log.info("kvtier: io_backend=auto chose POSIX (kvikio %s: %s)", status["mode"], status["reason"])
        return PosixIO()
    raise ValueError(f"io_backend: expected one of ('auto', 'posix', 'kvikio'), got {name!r}")
