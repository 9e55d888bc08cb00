"""The disk tier's folder: its checks, its lock and its manifest.

- **Checks**: the folder is created 0700; an existing one must be owned by this user and
  not world-writable (anyone else could plant files or symlinks in it); files are created
  0600 and opened with ``O_NOFOLLOW`` (a symlink is never followed, never created through).
- **Lock**: ``LOCK`` holds an exclusive ``flock`` for the life of the store and the
  holder's pid and host. The kernel drops the lock when the process dies, however it dies,
  so a stale lock never blocks a restart; a second opener gets :class:`StoreLockedError`
  naming the holder. Two stores on one folder served each other's bytes (issue 10, case 1).
- **Manifest**: ``MANIFEST`` names the store (a random uuid stamped in every slot header)
  and a generation high-water mark, reserved in blocks ahead of use: every generation ever
  stamped in a slot header is at most the persisted mark. At a clean close it also names
  ``INDEX``, the exact (slot, key, generation) of every valid slot, which the next open
  checks every header against. Both files are replaced atomically: written to a temporary
  file, fsynced, renamed over the old one, and the folder fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import struct
import uuid
from pathlib import Path

import crc32c
import numpy as np

from kvtier.errors import ConfigError, StoreLockedError
from kvtier.tiers.io import IOBackend

__all__ = ["GENERATION_BLOCK", "Manifest", "StoreDirectory"]

#: Generations reserved per manifest write: one fsynced rename per million slot writes.
GENERATION_BLOCK = 1 << 20
_MANIFEST = "MANIFEST"
_INDEX = "INDEX"
_LOCK = "LOCK"
_MANIFEST_FORMAT = 1
# INDEX rows: slot, seq_id, layer, chunk_idx, generation (int64 each, little-endian).
_ROW = 5
_CRC = struct.Struct("<I")


class Manifest:
    """What ``MANIFEST`` says: store uuid, generation mark and, after a clean close, the index."""

    def __init__(
        self,
        store_id: bytes,
        mark: int,
        *,
        synced: int = 0,
        boot_id: str = "",
        clean: bool = False,
        index_crc: int | None = None,
    ) -> None:
        self.store_id = store_id
        self.mark = mark
        #: Every write (payload, header, clear) issued before the slot write of generation
        #: ``synced + 1`` had been made durable (fsync) when this manifest was written.
        self.synced = synced
        #: The kernel boot id of the writer: a different one at the next open means the
        #: machine rebooted (power loss, OS crash), so only ``synced`` is known to be on disk.
        self.boot_id = boot_id
        self.clean = clean
        self.index_crc = index_crc

    def to_bytes(self) -> bytes:
        body = json.dumps(
            {
                "format": _MANIFEST_FORMAT,
                "store_id": self.store_id.hex(),
                "generation_mark": self.mark,
                "synced_generation": self.synced,
                "boot_id": self.boot_id,
                "clean": self.clean,
                "index_crc32c": self.index_crc,
            },
            sort_keys=True,
        ).encode()
        return body + b"\n" + f"{crc32c.crc32c(body):08x}\n".encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest | str:
        """The manifest, or why it does not verify."""
        lines = raw.split(b"\n")
        if len(lines) < 2:
            return "truncated manifest"
        body, crc = lines[0], lines[1]
        try:
            if int(crc, 16) != crc32c.crc32c(body):
                return "manifest checksum mismatch"
            d = json.loads(body)
            if d.get("format") != _MANIFEST_FORMAT:
                return f"manifest format {d.get('format')}, expected {_MANIFEST_FORMAT}"
            return cls(
                bytes.fromhex(d["store_id"]),
                int(d["generation_mark"]),
                synced=int(d["synced_generation"]),
                boot_id=str(d["boot_id"]),
                clean=bool(d["clean"]),
                index_crc=d["index_crc32c"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable manifest ({exc})"


class StoreDirectory:
    """The checked, locked folder of one disk tier.

    Parameters
    ----------
    path : str or Path
        The folder; created (0700, parents too) when missing.
    io : IOBackend
        File creation, renames and syncs go through it (the fault-injection seam).

    Raises
    ------
    ConfigError
        If the folder is not a folder, is owned by another user, is world-writable, or
        cannot be written.
    StoreLockedError
        If another store (this process or another) holds the folder.
    """

    def __init__(self, path: str | Path, io: IOBackend) -> None:
        self.path = Path(path)
        self.io = io
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"StoreConfig.disk_dir: expected a folder kvtier can create, got {path} ({exc})") from exc
        check_folder(self.path)
        self._lock_fd = self._lock()

    # ------------------------------------------------------------------ lock
    def _lock(self) -> int:
        lock_path = self.path / _LOCK
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"StoreConfig.disk_dir: expected a writable folder, got {self.path} ({exc.strerror})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "an unknown holder"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreLockedError(
                    f"StoreConfig.disk_dir: expected a folder no other store uses, got {self.path} "
                    f"locked by {holder}"
                ) from exc
            raise ConfigError(f"StoreConfig.disk_dir: could not lock {lock_path} ({exc.strerror})") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        return fd

    def release(self) -> None:
        """Drop the lock (close); the folder may then be opened by another store."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the last fd of the open file releases the flock
            self._lock_fd = -1

    # ------------------------------------------------------------------ files
    def replace_file(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically: temporary file, fsync, rename over, fsync the folder."""
        final = str(self.path / name)
        tmp = f"{final}.tmp"
        fd = self.io.create(tmp)
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += self.io.pwrite(fd, view[done:], done)
            self.io.sync(fd)
        finally:
            self.io.close(fd)
        self.io.rename(tmp, final)
        self.io.sync_dir(str(self.path))

    def read_file(self, name: str) -> bytes | None:
        """The bytes of ``name`` (not following symlinks), or None if it is missing."""
        try:
            fd = self.io.open_rw(str(self.path / name))
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            return self.io.pread(fd, size, 0)
        finally:
            self.io.close(fd)

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a replace that a crash interrupted never count."""
        for p in self.path.glob("*.tmp"):
            self.io.unlink(str(p))

    # ------------------------------------------------------------------ manifest and index
    def load_manifest(self) -> Manifest | str | None:
        """The manifest, why it does not verify, or None when there is none."""
        raw = self.read_file(_MANIFEST)
        return None if raw is None else Manifest.from_bytes(raw)

    def save_manifest(self, manifest: Manifest) -> None:
        self.replace_file(_MANIFEST, manifest.to_bytes())

    @staticmethod
    def new_store_id() -> bytes:
        return uuid.uuid4().bytes

    def save_index(self, rows: np.ndarray) -> int:
        """Write INDEX (``[n, 5]`` int64 rows: slot, seq_id, layer, chunk_idx, generation);
        return its crc32c for the manifest."""
        data = np.ascontiguousarray(rows, dtype="<i8").tobytes()
        self.replace_file(_INDEX, data)
        return crc32c.crc32c(data)

    def load_index(self, crc: int) -> dict[int, tuple[int, int, int, int]] | str:
        """slot -> (seq_id, layer, chunk_idx, generation) from INDEX, or why it does not verify."""
        raw = self.read_file(_INDEX)
        if raw is None:
            return "index missing"
        if crc32c.crc32c(raw) != crc or len(raw) % (8 * _ROW):
            return "index checksum mismatch"
        rows = np.frombuffer(raw, dtype="<i8").reshape(-1, _ROW)
        return {int(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}


def check_folder(path: Path) -> None:
    """Refuse a folder another user could plant files in: foreign-owned or world-writable."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"StoreConfig.disk_dir: expected a folder, got {path} which is not one")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"StoreConfig.disk_dir: expected a folder owned by uid {os.geteuid()}, got {path} owned by uid {st.st_uid}"
        )
    if st.st_mode & stat.S_IWOTH:
        raise ConfigError(
            f"StoreConfig.disk_dir: expected a folder others cannot write, got {path} with mode "
            f"{stat.S_IMODE(st.st_mode):o}"
        )
