"""Hypothesis state machine: TieredStore against a shadow dict, with reopen.

Invariants checked after every step: every read is bit-exact or a reported miss (and with
disk room for every key, nothing written and not dropped is ever missed); no tier holds
more bytes than its budget; a pinned chunk's slot keeps its bytes (even after it was
overwritten or dropped) until its last unpin.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier import ChunkKey, KVLayout, StoreConfig, TieredStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_size=4, group_size=2)
CB = LAYOUT.chunk_bytes
ALL_KEYS = [ChunkKey(s, layer, c) for s in range(2) for layer in range(2) for c in range(3)]  # 12 keys
keys_st = st.sampled_from(ALL_KEYS)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (compared as bytes, so NaN patterns count)."""
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _chunk(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (CB,), dtype=torch.uint8, generator=g)
    return raw.view(LAYOUT.dtype).view(LAYOUT.chunk_shape)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvtier-sm-")
        # 3 host slots, 2 device slots, 14 disk slots: one per possible key plus one for each
        # of the (at most 2) pinned old versions, which keep their disk slots until unpinned;
        # so no key may ever be lost ("while disk space allows").
        self.config = StoreConfig(
            gpu_bytes=2 * CB,
            host_bytes=3 * CB,
            disk_bytes=14 * 8192,
            disk_dir=self.dir,
            device="cpu",
            io_threads=2,
        )
        self.store = TieredStore(LAYOUT, self.config)
        self.shadow: dict[ChunkKey, int] = {}
        self.pins: Counter[ChunkKey] = Counter()
        self.pinned_slots: list[tuple[ChunkKey, int, int]] = []  # (key, host slot, seed) held by pins

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(key=keys_st, seed=st.integers(0, 10**6))
    def write(self, key: ChunkKey, seed: int) -> None:
        self.store.write(key, _chunk(seed))
        self.shadow[key] = seed

    @rule(keys=st.lists(keys_st, min_size=1, max_size=6))
    def read(self, keys: list[ChunkKey]) -> None:
        out = torch.empty(len(keys), *LAYOUT.chunk_shape, dtype=LAYOUT.dtype)
        missed = set(self.store.read(keys, out))
        for i, k in enumerate(keys):
            if k in self.shadow:
                assert k not in missed, f"lost {k}"
                assert _same(out[i], _chunk(self.shadow[k])), f"wrong bytes for {k}"
            else:
                assert k in missed

    @rule(keys=st.lists(keys_st, min_size=1, max_size=4, unique=True), to=st.sampled_from(["host", "device"]))
    def prefetch(self, keys: list[ChunkKey], to: str) -> None:
        failed = set(self.store.prefetch(keys, to=to).wait(timeout=30))
        assert failed == {k for k in keys if k not in self.shadow} | (failed & set(self.shadow))
        for k in keys:
            if k in self.shadow and k not in failed:
                slab, slots = (
                    (self.store.host_slab, self.store.host_slots([k]))
                    if to == "host"
                    else (self.store.device_slab, self.store.device_slots([k]))
                )
                if slots.item() >= 0:
                    assert _same(slab[slots.item()], _chunk(self.shadow[k])), f"wrong bytes for {k} in {to}"

    # At most 2 pinned versions, so one of the 3 host slots stays free for writes.
    @precondition(lambda self: self.shadow and len(self.pinned_slots) < 2)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.shadow)))
        slot = self.store.host_slots([key]).item()
        if slot < 0:  # pin a disk-only chunk, then bring it to host: its slot is then fixed
            self.store.pin([key])
            assert self.store.prefetch([key], to="host").wait(timeout=30) == []
            slot = self.store.host_slots([key]).item()
        else:
            self.store.pin([key])
        self.pins[key] += 1
        self.pinned_slots.append((key, slot, self.shadow[key]))

    @precondition(lambda self: self.pinned_slots)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted({k for k, _, _ in self.pinned_slots})))
        # unpin(key) releases the key's oldest pinned version: the first one in our list.
        self.pinned_slots.pop(next(i for i, p in enumerate(self.pinned_slots) if p[0] == key))
        self.store.unpin([key])
        self.pins[key] -= 1

    @rule(seq=st.integers(0, 1))
    def drop(self, seq: int) -> None:
        n = self.store.drop(seq)
        assert n == sum(1 for k in self.shadow if k.seq_id == seq)
        self.shadow = {k: v for k, v in self.shadow.items() if k.seq_id != seq}

    @precondition(lambda self: not self.pinned_slots)
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = TieredStore(LAYOUT, self.config)
        assert set(self.store.keys()) == set(self.shadow)

    @invariant()
    def budgets_hold(self) -> None:
        stats = self.store.stats()
        for tier, budget in (
            ("device", self.config.gpu_bytes),
            ("host", self.config.host_bytes),
            ("disk", self.config.disk_bytes),
        ):
            assert stats[tier]["used_bytes"] <= stats[tier]["capacity_bytes"] <= budget

    @invariant()
    def pinned_bytes_stay_put(self) -> None:
        for _, slot, seed in self.pinned_slots:
            assert _same(self.store.host_slab[slot], _chunk(seed)), f"pinned host slot {slot} changed"

    @invariant()
    def index_matches_shadow(self) -> None:
        assert set(self.store.keys()) == set(self.shadow)


StoreMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestStoreMachine = StoreMachine.TestCase
