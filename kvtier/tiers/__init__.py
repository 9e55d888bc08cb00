"""Storage tiers: device (HBM), host (pinned) and disk, and the disk I/O backends."""

from kvtier.tiers.base import PAGE_BYTES, ChunkKey, SlotAllocator, Tier
from kvtier.tiers.device import DeviceTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostTier
from kvtier.tiers.io import IOBackend, KvikioIO, PosixIO, kvikio_status, make_backend
from kvtier.tiers.policy import EvictionPolicy, LRUPolicy

__all__ = [
    "PAGE_BYTES",
    "ChunkKey",
    "DeviceTier",
    "DiskTier",
    "EvictionPolicy",
    "HostTier",
    "IOBackend",
    "KvikioIO",
    "LRUPolicy",
    "PosixIO",
    "SlotAllocator",
    "Tier",
    "kvikio_status",
    "make_backend",
]
