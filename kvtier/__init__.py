"""kvtier: tiered K/V storage and Hierarchical Global Attention for long-context inference."""

from kvtier.attention import hga_attention
from kvtier.config import HGAConfig, StoreConfig
from kvtier.engine import HGAEngine
from kvtier.errors import (
    CapacityError,
    ConfigError,
    CorruptChunkError,
    KvtierError,
    LayoutMismatchError,
    SnapshotError,
    StoreLockedError,
    TierUnavailableError,
    TransferError,
)
from kvtier.layout import KVLayout
from kvtier.rope import RopeSpec, rope_spec_of
from kvtier.snapshot import export_sequence, import_sequence
from kvtier.store import ChunkKey, PrefetchHandle, TieredStore

__version__ = "0.1.0"

__all__ = [
    "hga_attention",
    "HGAEngine",
    "HGAConfig",
    "StoreConfig",
    "KVLayout",
    "RopeSpec",
    "rope_spec_of",
    "TieredStore",
    "ChunkKey",
    "PrefetchHandle",
    "export_sequence",
    "import_sequence",
    "KvtierError",
    "ConfigError",
    "LayoutMismatchError",
    "SnapshotError",
    "StoreLockedError",
    "CapacityError",
    "TransferError",
    "CorruptChunkError",
    "TierUnavailableError",
]
