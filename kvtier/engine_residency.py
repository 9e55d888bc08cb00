"""Residency for :class:`kvtier.engine.HGAEngine`: the store callbacks, and routed chunks made host-resident.

:class:`_Residency` is mixed into the engine: it keeps the slot tables current from the
store's host-slot callback, pins a block's routed chunks, waits for those on disk only and
prefetches the rest of the fetch set.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvtier.engine_state import _Layer
from kvtier.errors import CapacityError, TransferError
from kvtier.store import ChunkKey

_PREFETCH_TTL = 64  # decode steps a prefetched chunk is tracked for the prefetch hit share


class _TooManyChunks(CapacityError):
    """One block's routed chunks of one layer do not fit in the host tier at once."""


class _Residency:
    """Store callbacks and residency of :class:`kvtier.engine.HGAEngine` (its state, its store)."""

    # ------------------------------------------------------------------ store callbacks
    def _on_host_slot(self, key: ChunkKey, slot: int) -> None:
        """Store callback (under its lock, any thread): keep the slot tables current."""
        b, j = key.seq_id - self.first_seq_id, key.chunk_idx
        if not 0 <= b < self.batch_size:
            return  # another engine's sequence
        st = self._layers[key.layer]
        if j >= st.cap:
            return
        st.host_np[b, j] = slot
        self._slot_changes += 1
        if st.host_dev is not None:
            st.dirty.add((b, j))
        if j < st.num_closed:
            if slot < 0:
                st.missing.add((b, j))
            else:
                st.missing.discard((b, j))

    def _fence(self) -> None:
        """Store fence: a host slot freed by eviction may be read by a queued gather."""
        if self._gather_event is not None:
            self.counters.fence_waits += 1
            self._gather_event.synchronize()

    # ------------------------------------------------------------------ residency
    def _keys_of(self, st: _Layer, ids: torch.Tensor) -> list[ChunkKey]:
        """Distinct (row, layer, chunk) keys of the chunks of global group ids ``[B, ...]`` (-1 = none)."""
        m = self.hga.groups_per_chunk
        flat = ids.reshape(ids.shape[0], -1)
        rows = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(flat)
        code = torch.where(flat >= 0, rows * (1 << 40) + flat // m, -1).reshape(-1)
        code = torch.unique(code[code >= 0])
        if code.device.type != "cpu":
            self.counters.host_syncs += 1
        base = self.first_seq_id
        return [ChunkKey(base + (x >> 40), st.index, x & ((1 << 40) - 1)) for x in code.tolist()]

    def _row(self, key: ChunkKey) -> int:
        """Batch row of a store key of this engine."""
        return key.seq_id - self.first_seq_id

    def _make_resident(
        self, st: _Layer, attended: torch.Tensor, fetch: Callable[[], torch.Tensor]
    ) -> list[ChunkKey]:
        """Pin the routed chunks, wait for those on disk only, prefetch the rest of the fetch set.

        Returns the pinned keys (the caller unpins them once its gather is queued).
        """
        store = self.store
        need = self._keys_of(st, attended)
        host_slots = store.host_slab.shape[0]
        if len(need) > host_slots and any(st.host_np[self._row(k), k.chunk_idx] < 0 for k in need):
            raise _TooManyChunks(
                f"host tier: expected room for one block's {len(need)} routed chunks of layer {st.index}, "
                f"got {host_slots} slots; raise StoreConfig.host_bytes"
            )
        with store.host_lock():
            slots = {key: int(st.host_np[self._row(key), key.chunk_idx]) for key in need}
            for key in need:
                if st.prefetched.pop((self._row(key), key.chunk_idx), None) is not None and slots[key] >= 0:
                    self.counters.prefetch_hits += 1
            try:
                store.pin(need)
            except KeyError as exc:
                raise TransferError(
                    f"HGAEngine layer {st.index}: expected every routed chunk in the store, got {exc.args[0]}"
                ) from None
        waits = [key for key in need if slots[key] < 0]
        try:
            if waits:
                self.counters.disk_waits += len(waits)
                t0 = time.perf_counter()
                store.prefetch(waits, to="host").wait()
                lost = [key for key in waits if st.host_np[self._row(key), key.chunk_idx] < 0]
                if lost and self._inflight and all(store.where(key) for key in lost):
                    # No host room: the slots may be held by this engine's own earlier prefetches,
                    # still in flight (a tiny host tier, 1 run in 40 here): let them land, retry once.
                    for handle in self._inflight:
                        handle.wait()
                    self._inflight.clear()
                    store.prefetch(lost, to="host").wait()
                    lost = [key for key in lost if st.host_np[self._row(key), key.chunk_idx] < 0]
                self.counters.disk_wait_s += time.perf_counter() - t0
                if lost and all(store.where(key) for key in lost):
                    raise CapacityError(
                        f"HGAEngine layer {st.index}: expected room in the host tier for {len(lost)} routed chunks "
                        f"read from disk (first {tuple(lost[0])}), got none: every slot pinned or in flight, or the "
                        "read failed (see the kvtier.store log); raise StoreConfig.host_bytes"
                    )
                if lost:
                    raise TransferError(
                        f"HGAEngine layer {st.index}: expected routed chunks readable from disk, got {len(lost)} "
                        f"failed or lost (first {tuple(lost[0])}); see the kvtier.store log"
                    )
            if self.prefetch:
                want = set(self._keys_of(st, fetch())) - set(need)
                step = self.counters.decode_steps
                extra = [
                    key for key in sorted(want)
                    if st.host_np[self._row(key), key.chunk_idx] < 0 and (self._row(key), key.chunk_idx) not in st.prefetched
                ]  # fmt: skip
                if extra:
                    self._inflight = [h for h in self._inflight if not h.done()]
                    self._inflight.append(store.prefetch(extra, to="host"))
                    self.counters.prefetch_issued += len(extra)
                    st.prefetched.update(((self._row(key), key.chunk_idx), step) for key in extra)
                for rc, asked in list(st.prefetched.items()):
                    if step - asked > _PREFETCH_TTL:
                        del st.prefetched[rc]
        except BaseException:
            store.unpin(need)
            raise
        return need

    def _fetch_set(self, chunk_ids: torch.Tensor, fetch_ids: torch.Tensor) -> torch.Tensor:
        """What prefetch brings to the host tier, as group ids ``[B, n]``: the groups of
        ``fetch_group_ids`` and the first group of every routed chunk (a chunk the router picked
        but no query attended yet is the likeliest to be attended at the next step)."""
        m = self.hga.groups_per_chunk
        b = chunk_ids.shape[0]
        first = torch.where(chunk_ids >= 0, chunk_ids * m, -1)
        return torch.cat((fetch_ids.reshape(b, -1), first.reshape(b, -1)), dim=1)

    def _drain(self, st: _Layer) -> None:
        """Copy slot-table changes to the device table (CUDA; under the store lock)."""
        if st.host_dev is None or not st.dirty:
            return
        items = list(st.dirty)
        st.dirty.clear()
        rows = torch.tensor([i for i, _ in items], dtype=torch.long)
        cols = torch.tensor([j for _, j in items], dtype=torch.long)
        vals = st.host_cpu[rows, cols]  # type: ignore[index]
        st.host_dev[rows.to(self.device), cols.to(self.device)] = vals.to(self.device)

    def _resident(
        self, st: _Layer, attended: torch.Tensor, fetch: Callable[[], torch.Tensor], gather: Callable[[], bool]
    ) -> None:
        """Run ``gather`` under the store lock once every attended chunk is host-resident.

        ``fetch()`` builds the fetch set only when residency is checked (a steady step never
        launches those ops).

        ``gather`` returns False when it finds an attended chunk off the host tier (the torch
        flow checks its slots); it then runs again after :meth:`_make_resident`.
        """
        pinned: list[ChunkKey] = []
        checked = False
        try:
            for _ in range(4):
                if (st.missing or st.prefetched) and not checked:
                    pinned = self._make_resident(st, attended, fetch)
                    checked = True
                with self.store.host_lock():
                    if st.missing and not checked:
                        continue
                    self._drain(st)
                    if gather():
                        return
                if checked:
                    break
                checked = False
            raise CapacityError(
                f"HGAEngine layer {st.index}: expected the routed chunks to stay host-resident, got them evicted "
                "again; raise StoreConfig.host_bytes"
            )
        finally:
            if pinned:
                self.store.unpin(pinned)
