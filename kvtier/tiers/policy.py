"""Eviction policies: which unpinned chunk of a tier leaves first. CPU-only and deterministic."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol

__all__ = ["EvictionPolicy", "LRUPolicy", "make_policy"]


class EvictionPolicy(Protocol):
    """Order of eviction candidates of one tier. The store skips pinned candidates."""

    def touch(self, key: Hashable) -> None:
        """``key`` was stored or used in this tier."""
        ...

    def remove(self, key: Hashable) -> None:
        """``key`` left this tier (a no-op when absent)."""
        ...

    def candidates(self) -> Iterator[Hashable]:
        """Keys in eviction order, first to leave first; stop iterating before mutating."""
        ...

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def touch(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[Hashable]:
        # A live view: callers stop iterating before they evict (O(1) per eviction
        # instead of copying 10^4+ keys).
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy for ``StoreConfig.eviction``."""
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"eviction: expected one of {sorted(_POLICIES)}, got {name!r}") from None
