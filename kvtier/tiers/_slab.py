"""Shared body of the in-memory tiers: one slab tensor ``[num_slots, 2, Hkv, C, D]``."""

from __future__ import annotations

import torch

from kvtier._checks import check_tensor
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout
from kvtier.tiers.base import SlotAllocator, SlotCounts

__all__ = ["SlabTier", "check_chunk", "slots_for_budget"]


def slots_for_budget(name: str, budget_bytes: int, slot_bytes: int) -> int:
    """Slots that fit in ``budget_bytes``; :class:`ConfigError` when not even one does."""
    num_slots = budget_bytes // slot_bytes
    if num_slots < 1:
        raise ConfigError(
            f"{name}: expected a budget of at least one slot ({slot_bytes} bytes), got {budget_bytes} bytes"
        )
    return num_slots


def check_chunk(
    name: str, chunk: object, layout: KVLayout, device: torch.device | None = None
) -> torch.Tensor:
    """Validate one chunk ``[2, Hkv, C, D]`` of ``layout.dtype``, contiguous."""
    t = check_tensor(name, chunk, ndim=4, dtypes=(layout.dtype,), device=device)
    if tuple(t.shape) != layout.chunk_shape:
        raise ValueError(
            f"{name}: expected shape {list(layout.chunk_shape)} [2, Hkv, C, D], got {list(t.shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    if t.device.type not in ("cpu", "cuda"):
        # A meta tensor has no bytes: copying it raises NotImplementedError deep in torch.
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {t.device}")
    return t


class SlabTier(SlotCounts):
    """Fixed slots in one preallocated slab tensor; no eviction, no policy."""

    def __init__(self, layout: KVLayout, slab: torch.Tensor) -> None:
        self.layout = layout
        self._slab = slab
        self._slot_bytes = layout.chunk_bytes
        self._alloc = SlotAllocator(slab.shape[0])

    @property
    def slab(self) -> torch.Tensor:
        """The slab ``[num_slots, 2, Hkv, C, D]``, ``layout.dtype``; slot ids index dim 0."""
        return self._slab

    @property
    def device(self) -> torch.device:
        """Device of the slab."""
        return self._slab.device

    def allocate(self) -> int:
        """Lowest free slot; :class:`kvtier.CapacityError` when full."""
        return self._alloc.allocate()

    def free(self, slot: int) -> None:
        """Return ``slot`` to the free list (its bytes stay until overwritten)."""
        self._alloc.free(slot)

    def _check_slot(self, slot: int) -> None:
        if not self._alloc.is_used(slot):
            raise ValueError(f"slot: expected an allocated slot id, got {slot}")

    def view(self, slot: int) -> torch.Tensor:
        """The slot's chunk ``[2, Hkv, C, D]`` as a view of the slab (no copy)."""
        self._check_slot(slot)
        return self._slab[slot]

    def write(self, slot: int, chunk: torch.Tensor, *, non_blocking: bool = False) -> None:
        """Copy ``chunk`` ``[2, Hkv, C, D]`` (any device, ``layout.dtype``) into ``slot``."""
        self._check_slot(slot)
        check_chunk("chunk", chunk, self.layout)
        # detach: copying a tensor that requires grad would make the whole slab require grad
        # (and every later in-place read of it fail).
        self._slab[slot].copy_(chunk.detach(), non_blocking=non_blocking)

    def read_into(self, slot: int, out: torch.Tensor, *, non_blocking: bool = False) -> None:
        """Copy ``slot`` into ``out`` ``[2, Hkv, C, D]`` (caller-owned, contiguous, any device)."""
        self._check_slot(slot)
        check_chunk("out", out, self.layout)
        out.copy_(self._slab[slot], non_blocking=non_blocking)
