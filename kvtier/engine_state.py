"""What :class:`kvtier.engine.HGAEngine` keeps: per-layer state (:class:`_Layer`) and Python counters.

The layout of each tensor is in the :mod:`kvtier.engine` module docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtier.decode_step import LayerDecode
from kvtier.reference.hga import RouteCarry


def _normal_tensors() -> Any:
    """Engine state is created outside inference mode: it is updated in place across calls
    that may run inside or outside ``torch.inference_mode()`` and by the store's I/O threads."""
    return torch.inference_mode(False)


@dataclass
class _Counters:
    """Python-side counters of the engine (device-side ones live in tensors)."""

    queries: int = 0
    decode_steps: int = 0
    disk_waits: int = 0  # routed chunks a step waited for (disk to host)
    disk_wait_s: float = 0.0
    prefetch_issued: int = 0
    prefetch_hits: int = 0  # routed chunks that were disk-resident, made host-resident by prefetch in time
    host_syncs: int = 0  # deliberate device-to-host reads (residency checks, table sizes)
    fence_waits: int = 0  # host slot reuse waited for queued gathers


class _Layer:
    """State of one layer (see the module docstring)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num_tokens = 0
        self.num_closed = 0
        self.cap = 0
        self.cs: torch.Tensor | None = None  # [B, Hkv, cap, D] float32
        self.gs: torch.Tensor | None = None  # [B, Hkv, cap, M, D] float32
        self.slab: torch.Tensor | None = None  # [B * hot + cache slots, 2, Hkv, C, D]
        self._ring: torch.Tensor | None = None  # [B, hot, 2, Hkv, C, D] view of its first slots
        self.ring_chunk: list[int] = []  # chunk held by each ring slot (-1: none)
        self.slot_map: torch.Tensor | None = None  # [B, cap] int32, ring slot of window chunks
        self.host_np: np.ndarray = np.zeros((0, 0), dtype=np.int32)  # [B, cap] host slot, -1 absent
        self.host_cpu: torch.Tensor | None = None  # torch view of host_np
        self.host_dev: torch.Tensor | None = None  # device copy (CUDA only)
        self.dirty: set[tuple[int, int]] = set()  # entries of host_np not yet in host_dev
        self.missing: set[tuple[int, int]] = set()  # closed chunks not in the host tier
        self.prefetched: dict[tuple[int, int], int] = {}  # (row, chunk) -> decode step it was asked for
        # group cache (kernels): where [B, Hkv, cap * M], tags / stamp [B, Hkv, E], counter [B, Hkv]
        self.where: torch.Tensor | None = None
        self.tags: torch.Tensor | None = None
        self.stamp: torch.Tensor | None = None
        self.counter: torch.Tensor | None = None
        self.decode: LayerDecode | None = None
        # Routing options that keep state across the positions of one chunk (a running-max
        # chunk score) carry it from block to block: RoutePlan.carry of the last block (torch
        # flow), or the kernels' maxima [R, B, Hq, cap] float32 by chunk index (kernel flow,
        # R running terms), which route_chunks resets itself when a chunk opens.
        self.carry: RouteCarry | None = None
        self.running: torch.Tensor | None = None

    @property
    def ring(self) -> torch.Tensor:
        """``[B, hot, 2, Hkv, C, D]`` view of the ring slots."""
        assert self._ring is not None
        return self._ring

    def host_table(self) -> torch.Tensor:
        """Slot table the compute device reads: ``[B, cap]`` int32."""
        return self.host_dev if self.host_dev is not None else self.host_cpu  # type: ignore[return-value]
