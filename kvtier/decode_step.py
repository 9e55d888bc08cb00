"""One layer's decode step on the Triton kernels, over preallocated buffers: :class:`LayerDecode`.

Made by :class:`kvtier.engine.HGAEngine` (``engine.decoder(layer)``), which keeps the residency
and slot-table bookkeeping around it; benchmarks and CUDA-graph capture run its stages directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvtier.layout import windows_at
from kvtier.reference.hga import plan_widths

if TYPE_CHECKING:
    from kvtier.engine import HGAEngine, _Layer

__all__ = ["LayerDecode"]


class LayerDecode:
    """One layer's decode step on the kernels, over preallocated buffers (made by :class:`HGAEngine`).

    :meth:`step` routes ``q`` (``route_chunks``, ``route_groups``), deduplicates the groups the
    query heads of each KV head ask for and finds them in the device group cache
    (``assign_groups``), gathers the misses from the store's host slab (``gather_groups``:
    zero-copy reads of pinned memory) and attends (``sparse_decode`` over the layer's slab:
    ring slots for windows and the open chunk, cache entries for routed groups). Nothing
    synchronises with the host and nothing is allocated, so a step over host-resident chunks
    can be captured in a CUDA graph and replayed (at the same position: ``route_chunks``
    takes it as a scalar). The engine keeps the residency and slot-table bookkeeping around it.
    A running-max chunk score keeps its per-(row, query head, chunk) maxima in the layer's
    device carry (``_Layer.running``): ``route_chunks`` reads and updates it in place and
    resets it itself when the position opens a chunk, so a replayed graph stays correct.

    Attributes
    ----------
    q : Tensor ``[B, Hq, 1, D]``
        Query buffer: copy the step's query here.
    plan : tuple of Tensor
        ``chunk_ids, group_ids, fetch_ids`` ``[B, Hq, 1, Kc | Kg | Kf]`` int64 (RoutePlan).
    misses : Tensor ``[B, Hkv]`` int32
        Groups the last :meth:`assign` sent to the gather.
    table : Tensor ``[B * Hkv * R, 3]`` int32
        Gather rows of the last :meth:`assign`.
    out : Tensor ``[B, Hq, D]``
    """

    def __init__(self, engine: HGAEngine, st: _Layer, position: int) -> None:
        from kvtier.kernels.route_chunks import route_chunks_tiles

        self.engine = engine
        self.config = cfg = engine.hga
        c, g, m = cfg.chunk_size, cfg.group_size, cfg.groups_per_chunk
        b, hq, hkv, d = engine.batch_size, engine.num_q_heads, engine.num_kv_heads, engine.head_dim
        dev = engine.device
        assert st.slab is not None and st.cs is not None and st.gs is not None
        self.st = st
        self.host_slab = engine.store.host_slab
        self.device_slab = st.slab
        self.slot_map = st.slot_map
        self.chunk_summ, self.group_summ = st.cs, st.gs
        self.cap = st.cap
        self.widths = plan_widths(cfg, position)
        kc_w, kg_w, kf_w = self.widths
        self.route_options: dict[str, object] = {"precision": engine._precision()}
        self.group_warps = 4
        self.gather_rows = 1
        self.gather_segmented = False  # measured default: one program per table row
        self.tiles = route_chunks_tiles(self.cap, cfg.top_chunks, block_t=128 if dev.type == "cuda" else None)
        bt, nt, kt = self.tiles
        i32 = dict(dtype=torch.int32, device=dev)
        self.q = torch.zeros(b, hq, 1, d, dtype=st.slab.dtype, device=dev)
        # Room for the smallest tile width (most tiles) set_route_tiles may choose; one per
        # term of chunk_score (a split ranks by two).
        self.cands = tuple(
            torch.empty(b, hq, 1, max(nt, -(-self.cap // 16)), kt, dtype=torch.int64, device=dev)
            for _ in cfg.chunk_score_terms
        )
        self.carry = st.running  # [R, B, Hq, cap] float32 or None
        self.plan = tuple(torch.full((b, hq, 1, w), -1, dtype=torch.int64, device=dev) for w in self.widths)
        self.routed_dense = torch.full((b, hq, 1, kg_w), -1, **i32)
        e = engine.cache_entries
        self.order = torch.empty(b, hkv, e, **i32)
        self.misses = torch.zeros(b, hkv, **i32)
        rows = 1 << max(0, (hq // hkv * kf_w - 1).bit_length())
        self.table = torch.full((b * hkv * rows, 3), -1, **i32)
        self.routed = torch.full((b, hq, kg_w), -1, **i32)
        self.positions = torch.full((b,), position, **i32)
        self.max_keys = (cfg.sink_chunks + cfg.local_chunks + 1) * c + kg_w * g
        self.out = torch.empty(b, hq, d, dtype=st.slab.dtype, device=dev)
        self.base_block = b * engine.hot * m
        self.position = position
        self.num_cand_chunks = windows_at(position, c, cfg.sink_chunks, cfg.local_chunks).local_start
        self.set_decode_splits(None)

    def fits(self, position: int) -> bool:
        """Whether these buffers serve a step at ``position`` (same widths, same table capacity)."""
        return plan_widths(self.config, position) == self.widths and self.st.cap == self.cap

    def move_to(self, position: int) -> None:
        """Point the step at ``position`` (a device fill when it changed; no host sync)."""
        if position != self.position:
            self.positions.fill_(position)
            self.position = position
        cfg = self.config
        self.num_cand_chunks = windows_at(position, cfg.chunk_size, cfg.sink_chunks, cfg.local_chunks).local_start

    # -- tuning (kvtier bench attention)
    def reset_cache(self) -> None:
        """Forget every cached group of this layer (the next step is cold)."""
        st = self.st
        for t in (st.where, st.tags, st.stamp):
            t.fill_(-1)  # type: ignore[union-attr]
        st.counter.zero_()  # type: ignore[union-attr]

    def set_decode_splits(self, num_splits: int | None, block_n: int = 64) -> None:
        """Splits per query of the decode kernel (None: ``decode_num_splits``) and its key tile."""
        from kvtier.kernels.sparse_decode import decode_num_splits

        b, hq, d = self.out.shape
        if num_splits is None:
            num_splits = decode_num_splits(b, hq, self.max_keys, block_n=block_n)
        self.block_n = block_n
        self.workspace = torch.empty(b, hq, num_splits, d + 2, dtype=torch.float32, device=self.q.device)

    def set_route_tiles(self, block_t: int | None, group_warps: int = 4, **options: object) -> None:
        """Chunk-routing tile width (None: default), route_chunks options, route_groups warps."""
        from kvtier.kernels.route_chunks import route_chunks_tiles

        self.tiles = route_chunks_tiles(max(1, self.cap), self.config.top_chunks, block_t=block_t)
        self.route_options = dict(options)
        self.group_warps = group_warps

    # -- the stages of a step
    def route(self) -> None:
        """Routing of ``q``: fills ``plan``."""
        from kvtier.attention import kernel_chunk_table
        from kvtier.kernels.route_chunks import route_chunks
        from kvtier.kernels.route_groups import route_groups

        cfg = self.config
        if self.widths[0] == 0:
            return
        bt, nt, kt = self.tiles
        cands = [c[:, :, :, :nt, :kt] for c in self.cands]
        running = 0
        for term, cand in zip(cfg.chunk_score_terms, cands):
            table, score_options = kernel_chunk_table(term, cfg, self.chunk_summ, self.group_summ, self.num_cand_chunks)
            if term.startswith("running_"):  # one position: the carry is updated in place
                assert self.carry is not None
                score_options.update(carry_in=self.carry[running], carry_out=self.carry[running])
                running += 1
            route_chunks(
                self.q,
                table,
                cand,
                start_pos=self.position,
                chunk_size=cfg.chunk_size,
                sink_chunks=cfg.sink_chunks,
                local_chunks=cfg.local_chunks,
                block_t=bt,
                **self.route_options,  # type: ignore[arg-type]
                **score_options,  # type: ignore[arg-type]
            )
        route_groups(
            cands[0],
            self.q,
            self.group_summ,
            *self.plan,
            self.routed_dense,
            top_chunks=cfg.top_chunks,
            top_groups=cfg.top_groups,
            fetch_groups=cfg.fetch_groups,
            num_warps=self.group_warps,
            group_score=cfg.group_score,
            group_merge=cfg.group_merge,
            group_reserve=cfg.group_reserve,
            cand2=cands[1] if len(cands) > 1 else None,
        )

    def assign(self) -> None:
        """Dedup and cache lookup: fills ``table`` (gather rows) and the attention block table."""
        from kvtier.kernels.assign_groups import assign_groups

        st, cfg = self.st, self.config
        if self.widths[2] == 0:  # no candidate chunk yet (a context within the windows): nothing to fetch
            self.misses.zero_()
            return
        assign_groups(
            self.plan[2][:, :, 0],
            st.host_table(),
            st.where,  # type: ignore[arg-type]
            st.tags,  # type: ignore[arg-type]
            st.stamp,  # type: ignore[arg-type]
            st.counter,  # type: ignore[arg-type]
            self.order,
            self.misses,
            self.table,
            self.routed,
            group_size=cfg.group_size,
            chunk_size=cfg.chunk_size,
            base_block=self.base_block,
        )

    def gather(self) -> None:
        """Copy this step's misses from the host slab into the cache."""
        from kvtier.kernels.gather_groups import gather_groups

        g = self.config.group_size
        if self.widths[2] == 0:  # nothing fetched (see assign)
            return
        if self.gather_segmented:  # copies only the misses of each (b, kvh), counts from assign
            gather_groups(self.host_slab, self.table, self.device_slab, group_size=g, counts=self.misses.view(-1))
        else:
            gather_groups(self.host_slab, self.table, self.device_slab, group_size=g, rows_per_program=self.gather_rows)

    def attend(self) -> torch.Tensor:
        """Sparse decode attention over the layer's slab; returns ``out [B, Hq, D]``."""
        from kvtier.kernels.sparse_decode import sparse_decode

        cfg = self.config
        return sparse_decode(
            self.q[:, :, 0],
            self.device_slab[:, 0],
            self.device_slab[:, 1],
            self.positions,
            self.routed,
            self.out,
            self.workspace,
            chunk_size=cfg.chunk_size,
            group_size=cfg.group_size,
            sink_chunks=cfg.sink_chunks,
            local_chunks=cfg.local_chunks,
            slot_map=self.slot_map,
            block_n=self.block_n,
        )

    def step(self) -> torch.Tensor:
        """Route, assign, gather, attend for the query in ``q``; returns ``out [B, Hq, D]``."""
        self.route()
        self.assign()
        self.gather()
        return self.attend()
