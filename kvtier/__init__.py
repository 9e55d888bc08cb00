"""kvtier: tiered K/V storage and Hierarchical Global Attention for long-context inference."""

from kvtier.config import HGAConfig, StoreConfig
from kvtier.errors import (
    CapacityError,
    ConfigError,
    CorruptChunkError,
    KvtierError,
    LayoutMismatchError,
    TierUnavailableError,
    TransferError,
)
from kvtier.layout import KVLayout

__version__ = "0.1.0"

__all__ = [
    "HGAConfig",
    "StoreConfig",
    "KVLayout",
    "KvtierError",
    "ConfigError",
    "LayoutMismatchError",
    "CapacityError",
    "TransferError",
    "CorruptChunkError",
    "TierUnavailableError",
]
