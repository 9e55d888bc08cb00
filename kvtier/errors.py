"""Exception hierarchy of kvtier.

Bad arguments at the public boundary raise the built-in ``ValueError`` or ``TypeError``
(several classes below also derive from them, so callers may catch either). Failures of
the storage engine itself (a corrupt chunk, a short read, a full disk) raise or report a
:class:`KvtierError` subclass. Messages say what was expected and what was received and
never print tensor contents.
"""

from __future__ import annotations

__all__ = [
    "KvtierError",
    "ConfigError",
    "StoreLockedError",
    "LayoutMismatchError",
    "SnapshotError",
    "CapacityError",
    "TransferError",
    "CorruptChunkError",
    "TierUnavailableError",
]


class KvtierError(Exception):
    """Base class of every error kvtier raises on its own account."""


class ConfigError(KvtierError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class StoreLockedError(ConfigError):
    """The store folder is locked by another open store (the message names its pid and host)."""


class LayoutMismatchError(KvtierError, ValueError):
    """Stored data was written for another model shape, dtype, chunk size or format."""


class SnapshotError(KvtierError, ValueError):
    """A snapshot is not what its metadata promises, does not fit, or its sequence is incomplete."""


class CapacityError(KvtierError):
    """A tier has no room left: the budget is exhausted or every slot is pinned."""


class TransferError(KvtierError):
    """A read or write between tiers failed (I/O error, short read, full disk)."""


class CorruptChunkError(TransferError):
    """A stored chunk failed verification (checksum, magic, version or generation)."""


class TierUnavailableError(KvtierError):
    """A tier or I/O backend cannot be used on this machine (no GPU, no kvikio, ...)."""
