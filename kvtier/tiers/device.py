"""DeviceTier: fixed chunk slots in one slab on a torch device (HBM on a GPU, the CPU in CI)."""

from __future__ import annotations

import torch

from kvtier.layout import KVLayout
from kvtier.tiers._slab import SlabTier, slots_for_budget
from kvtier.tiers.base import slab_shape

__all__ = ["DeviceTier"]


class DeviceTier(SlabTier):
    """Chunk slots on one torch device, allocated once up front.

    Parameters
    ----------
    layout : KVLayout
        Geometry of a chunk ``[2, Hkv, C, D]``.
    capacity_bytes : int
        Budget; ``capacity_bytes // layout.chunk_bytes`` slots are allocated (at least 1).
    device : str or torch.device
        Any torch device: "cuda:0" in production, "cpu" stands in for it in CI.

    Attributes
    ----------
    slab : torch.Tensor
        ``[num_slots, 2, Hkv, C, D]``, ``layout.dtype``, on ``device``. Kernels index it by
        the slot ids of :meth:`kvtier.TieredStore.device_slots`.
    """

    def __init__(self, layout: KVLayout, capacity_bytes: int, device: str | torch.device = "cpu") -> None:
        num_slots = slots_for_budget("DeviceTier.capacity_bytes", capacity_bytes, layout.chunk_bytes)
        slab = torch.empty(slab_shape(num_slots, layout.chunk_shape), dtype=layout.dtype, device=device)
        super().__init__(layout, slab)
