"""What every tier shares: the ``Tier`` protocol, chunk keys, a slot allocator, aligned buffers.

A tier is a fixed set of equally sized slots. Slot ids are small ints, stable for the
life of the tier: a slot never moves, so a kernel may read a slot of a pinned chunk
while the store keeps working on other slots.
"""

from __future__ import annotations

import heapq
import logging
import mmap
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from kvtier.errors import CapacityError

__all__ = [
    "PAGE_BYTES",
    "ChunkKey",
    "SlotAllocator",
    "SlotCounts",
    "Tier",
    "align_up",
    "aligned_empty",
    "slab_shape",
]

log = logging.getLogger("kvtier.tiers")

#: Alignment of disk slots and of O_DIRECT buffers. 4 KiB is the logical block size of
#: every filesystem kvtier targets (ext4, xfs on NVMe) and the x86-64 page size.
PAGE_BYTES = 4096


def align_up(n: int, alignment: int = PAGE_BYTES) -> int:
    """Smallest multiple of ``alignment`` that is ``>= n``."""
    return -(-n // alignment) * alignment


class ChunkKey(NamedTuple):
    """Address of one stored chunk: ``(seq_id, layer, chunk_idx)``, each an int >= 0."""

    seq_id: int
    layer: int
    chunk_idx: int


@runtime_checkable
class Tier(Protocol):
    """The small interface every tier implements.

    Slots hold one chunk ``[2, Hkv, C, D]`` each. ``allocate`` never evicts: policy lives
    in :class:`kvtier.TieredStore`, tiers only hold bytes.
    """

    @property
    def capacity_bytes(self) -> int:
        """Bytes the tier may hold (``num_slots * slot_bytes``), never above its budget."""
        ...

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot occupies in this tier (payload plus any header and padding)."""
        ...

    @property
    def num_slots(self) -> int:
        """Slots in the tier."""
        ...

    @property
    def num_free(self) -> int:
        """Slots not allocated."""
        ...

    def allocate(self) -> int:
        """Reserve a free slot and return its id; raise :class:`CapacityError` when full."""
        ...

    def free(self, slot: int) -> None:
        """Return a slot to the free list."""
        ...


class SlotAllocator:
    """Free list of slot ids ``[0, num_slots)``; hands out the lowest free id first.

    Lowest-first keeps a disk tier's used slots packed at the start of its slab files,
    so files are created (and space is reserved) only as the store grows. Ids above the
    highest one ever handed out are implicit (a counter, not a list): a 64 GiB disk budget
    of 8 KiB slots is 8 million ids, which as a list cost 0.3 s and 300 MB at open.
    """

    def __init__(self, num_slots: int) -> None:
        self._num_slots = num_slots
        self._free: list[int] = []  # a heap of freed ids below _next
        self._next = 0  # every id >= _next is free
        self._used: set[int] = set()

    @property
    def num_slots(self) -> int:
        """Slots managed."""
        return self._num_slots

    @property
    def num_free(self) -> int:
        """Slots not allocated."""
        return self._num_slots - len(self._used)

    @property
    def num_used(self) -> int:
        """Slots allocated."""
        return len(self._used)

    def is_used(self, slot: int) -> bool:
        """Whether ``slot`` is currently allocated."""
        return slot in self._used

    def allocate(self) -> int:
        """Lowest free slot id; :class:`CapacityError` when none is free."""
        if self._free:
            slot = heapq.heappop(self._free)
        elif self._next < self._num_slots:
            slot = self._next
            self._next += 1
        else:
            raise CapacityError(f"expected a free slot, got all {self._num_slots} slots in use")
        self._used.add(slot)
        return slot

    def claim(self, slot: int) -> None:
        """Mark a specific free slot as used (index rebuild after reopen)."""
        if slot in self._used or not 0 <= slot < self._num_slots:
            raise ValueError(f"expected a free slot id in [0, {self._num_slots}), got {slot}")
        if slot >= self._next:
            for s in range(self._next, slot):
                heapq.heappush(self._free, s)
            self._next = slot + 1
        else:
            self._free.remove(slot)
            heapq.heapify(self._free)
        self._used.add(slot)

    def free(self, slot: int) -> None:
        """Return ``slot``; freeing a slot twice is an internal error."""
        if slot not in self._used:
            raise ValueError(f"expected an allocated slot, got {slot} which is free")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)


def slab_shape(num_slots: int, chunk_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a slab: ``[num_slots, 2, Hkv, C, D]``."""
    return (num_slots, *chunk_shape)


def aligned_empty(nbytes: int, *, pin: bool) -> tuple[torch.Tensor, bool]:
    """A page-aligned uint8 CPU tensor of ``nbytes`` bytes, pinned when asked and possible.

    Page alignment lets O_DIRECT reads land straight in the tensor (one syscall, no
    bounce copy). Pinned memory comes from ``cudaHostAlloc`` (page aligned); pageable
    memory from an anonymous ``mmap`` (page aligned too).

    Returns
    -------
    (tensor, pinned) : (torch.Tensor, bool)
        ``tensor`` has shape ``[nbytes]``, dtype uint8; ``pinned`` says whether pinning worked.
    """
    nbytes = max(int(nbytes), 1)
    if pin and torch.cuda.is_available():
        try:
            t = torch.empty(nbytes + PAGE_BYTES, dtype=torch.uint8, pin_memory=True)
            shift = (-t.data_ptr()) % PAGE_BYTES
            return t[shift : shift + nbytes], True
        except RuntimeError as exc:  # pinned memory is scarce: degrade, never crash
            log.warning("kvtier: pinning %d bytes failed (%s); using pageable memory", nbytes, exc)
    buf = mmap.mmap(-1, align_up(nbytes))
    # torch.frombuffer holds a reference to the mmap, which lives as long as the tensor.
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes), False


class SlotCounts:
    """Size accounting shared by the tiers that hand out fixed slots from a :class:`SlotAllocator`.

    Subclasses set ``_alloc`` and ``_slot_bytes``; a tier's capacity is ``num_slots`` whole
    slots, allocated up front, so ``used_bytes`` can never pass the budget it was built with.
    """

    _alloc: SlotAllocator
    _slot_bytes: int

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot occupies in this tier."""
        return self._slot_bytes

    @property
    def num_slots(self) -> int:
        """Slots within the budget."""
        return self._alloc.num_slots

    @property
    def num_free(self) -> int:
        """Slots not allocated."""
        return self._alloc.num_free

    @property
    def capacity_bytes(self) -> int:
        """``num_slots * slot_bytes``: never above the budget the tier was built with."""
        return self.num_slots * self._slot_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of allocated slots."""
        return self._alloc.num_used * self._slot_bytes
