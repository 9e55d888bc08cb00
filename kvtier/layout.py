"""Shapes, dtypes, chunk/group geometry and byte sizes: the one place they are defined.

Shape letters used in comments and docstrings across kvtier:

====  =====================================================================
B     batch (sequences)
Hq    query heads
Hkv   key/value heads (GQA: ``Hq % Hkv == 0``; query head h reads KV head ``h // (Hq // Hkv)``)
Lq    query tokens in one call;  Lk  key tokens (positions 0 .. Lk-1)
D     head dimension (even: RoPE pairs are dims (i, i + D/2), the ``rotate_half`` convention)
C     chunk size (tokens);  G  group size (tokens);  M = C / G groups per chunk
N     closed chunks
====  =====================================================================

A stored chunk of one layer is one contiguous tensor ``[2, Hkv, C, D]``: K then V, each
KV head's tokens contiguous, so one 16-token group of one KV head is two runs of
``G * D`` elements (4 KiB each at D=128 in bf16) and a whole chunk is one sequential read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from kvtier.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_DTYPES",
    "KVLayout",
    "Windows",
    "windows_at",
    "window_keys",
    "num_chunks",
    "anchor_position",
]

#: Version of the on-disk and snapshot chunk format; part of every layout fingerprint.
FORMAT_VERSION = 1

#: K/V dtypes the store and the kernels accept.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_chunks(num_tokens: int, chunk_size: int) -> int:
    """Chunks needed to hold ``num_tokens`` tokens, the last one possibly partial."""
    return -(-num_tokens // chunk_size)


def anchor_position(start: int, length: int) -> int:
    """Position at which an anchor (sum-then-rotate) summary is rotated: the unit's middle token."""
    return start + (length - 1) // 2


@dataclass(frozen=True)
class Windows:
    """Which chunks a query at one position sees, by role (half-open chunk ranges).

    Chunks ``[0, sink_end)`` are sinks, ``[sink_end, local_start)`` are routing candidates,
    ``[local_start, current)`` are the local window and chunk ``current`` holds the query
    itself (attended causally, up to and including the query's position).
    """

    sink_end: int
    local_start: int
    current: int

    @property
    def num_candidates(self) -> int:
        """Closed chunks between the sinks and the local window."""
        return self.local_start - self.sink_end


def windows_at(position: int, chunk_size: int, sink_chunks: int, local_chunks: int) -> Windows:
    """Chunk roles for a query at absolute ``position``.

    Only chunks that are closed (entirely before the query's own chunk) are sinks, local or
    candidates; the sink and local windows never overlap, and a candidate is never in either.
    """
    current = position // chunk_size
    sink_end = min(sink_chunks, current)
    local_start = max(sink_end, current - local_chunks)
    return Windows(sink_end=sink_end, local_start=local_start, current=current)


def window_keys(positions: torch.Tensor, chunk_size: int, sink_chunks: int, local_chunks: int) -> torch.Tensor:
    """Keys every query attends outside the routed groups: sinks, local window and its own chunk.

    The tensor form of :func:`windows_at`: ``positions [L]`` int -> ``[L]`` int, counting the
    own chunk's keys up to and including the query.
    """
    cur = positions // chunk_size
    sink_end = cur.clamp(max=sink_chunks)
    local_start = torch.maximum(sink_end, cur - local_chunks)
    return (sink_end + cur - local_start) * chunk_size + positions - cur * chunk_size + 1


@dataclass(frozen=True)
class KVLayout:
    """Geometry of the K/V of one model, as stored: every tier and snapshot is bound to it.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Model shape (layers, Hkv, D).
    dtype : torch.dtype
        K/V element type, one of float32, float16, bfloat16.
    chunk_size, group_size : int
        Tokens per chunk (C) and per group (G); G divides C.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    chunk_size: int = 64
    group_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_size", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"KVLayout.{name}: expected an int >= 1, got {value!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"KVLayout.dtype: expected one of {SUPPORTED_DTYPES}, got {self.dtype}")
        if self.chunk_size % self.group_size != 0:
            raise ConfigError(
                f"KVLayout.group_size: expected a divisor of chunk_size={self.chunk_size}, got {self.group_size}"
            )

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        """Shape of one stored chunk of one layer: ``[2, Hkv, C, D]`` (K then V)."""
        return (2, self.num_kv_heads, self.chunk_size, self.head_dim)

    @property
    def chunk_numel(self) -> int:
        """Elements in one stored chunk of one layer."""
        return 2 * self.num_kv_heads * self.chunk_size * self.head_dim

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one stored chunk of one layer."""
        return self.chunk_numel * self.itemsize

    @property
    def group_bytes(self) -> int:
        """Bytes of one group of one KV head, K and V together (what the gather moves)."""
        return 2 * self.group_size * self.head_dim * self.itemsize

    def describe(self) -> dict[str, object]:
        """JSON-able description, with the format version."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "chunk_size": self.chunk_size,
            "group_size": self.group_size,
            "format_version": FORMAT_VERSION,
        }

    def fingerprint(self) -> str:
        """Stable 16-hex-digit digest of :meth:`describe`; readers refuse a different one."""
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
