"""``kvtier.hga_attention``: Hierarchical Global Attention on the Triton kernels or the reference.

The kernel path computes the same function as :func:`kvtier.reference.hga_attention`:
summaries with the reference's own (vectorised torch) code, routing with
``route_chunks`` + ``route_groups`` (per query row, exact plan), attention with
``sparse_decode`` (one query) or ``sparse_prefill`` (query blocks of one chunk) over the
dense K/V, reading only the windows and the routed groups.
"""

from __future__ import annotations

import os

import torch

from kvtier.config import HGAConfig
from kvtier.kernels.assign_groups import assign_groups
from kvtier.kernels.gather_groups import gather_groups
from kvtier.kernels.route_chunks import route_chunks, route_chunks_tiles
from kvtier.kernels.route_groups import route_groups
from kvtier.kernels.sparse_decode import decode_num_splits, sparse_decode
from kvtier.kernels.sparse_prefill import sparse_prefill
from kvtier.layout import windows_at
from kvtier.reference import hga as _ref
from kvtier.reference.hga import HGAStats, RouteCarry, RoutePlan, plan_widths
from kvtier.reference.summaries import routing_summaries_ref
from kvtier.rope import RopeSpec

__all__ = ["hga_attention", "BACKENDS", "HostKVDecode", "prefill_tables"]

#: Accepted values of ``backend``.
BACKENDS = ("auto", "triton", "reference")

# Positions routed and attended per kernel launch in a long prefill: bounds the routing
# candidates ([B, Hq, rows, tiles, Kc] int64) and the visibility table to tens of MiB.
_ROWS_PER_SLICE = 1024


def _interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (set by tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def hga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    rope_theta: float | None = None,
    rope: RopeSpec | None = None,
    start_pos: int | None = None,
    backend: str = "auto",
    route_carry: RouteCarry | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, HGAStats]:
    """Hierarchical Global Attention: routed exact attention over windows and chosen groups.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]`` float32, float16 or bfloat16
        Post-RoPE queries at positions ``start_pos .. start_pos + Lq - 1``.
    k, v : Tensor ``[B, Hkv, Lk, D]``, dtype and device of ``q``
        Post-RoPE keys and values at positions ``0 .. Lk - 1``, ``Lk >= start_pos + Lq``,
        ``Hq % Hkv == 0``. The Triton path needs the last dim of q, k and v contiguous
        (any other strides, e.g. a transposed ``[B, L, H, D]`` tensor, are fine).
    config : HGAConfig
    rope_theta : float, optional
        RoPE base of a model with plain RoPE (half-split pairs over the whole head).
    rope : RopeSpec, optional
        The model's RoPE (:func:`kvtier.rope.rope_spec_of`); exactly one of ``rope_theta``
        and ``rope`` is given. The summaries the kernels route over use its frequencies.
    start_pos : int, optional
        Position of the first query. None (the default) means ``Lk - Lq``: the queries are the
        context's last positions, as in a decode step ``hga_attention(q[:, :, -1:], k, v, ...)``
        or a prefill of the whole context.
    backend : {"auto", "triton", "reference"}
        "auto" runs the kernels on CUDA tensors and the reference otherwise; the other two
        force a path ("triton" on CPU tensors needs ``TRITON_INTERPRET=1``).
    route_carry : RouteCarry, optional
        For a ``running_*`` chunk score starting inside a chunk: ``stats.plan.carry`` of the
        call that ended at ``start_pos - 1`` (see :func:`kvtier.reference.hga_attention`).
    scale : float, optional
        Softmax scale; ``D ** -0.5`` when None (a model's ``scaling``, e.g. Gemma's, goes here).

    Returns
    -------
    out : Tensor ``[B, Hq, Lq, D]`` in ``q.dtype``
    stats : HGAStats
        Keys attended per query, context lengths and the routing plan, equal to the
        reference's.

    Raises
    ------
    TypeError, ValueError
        On a wrong type, dtype, shape, device, stride, backend or an inconsistent length.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    start_pos = _ref.resolve_start_pos(q, k, start_pos)
    spec = _ref.check_hga_inputs(q, k, v, config, rope_theta, start_pos, rope=rope)
    scale = _ref.check_scale(scale, q.shape[-1])
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        return _ref.hga_attention(
            q, k, v, config=config, rope=spec, start_pos=start_pos, route_carry=route_carry, scale=scale
        )
    if not q.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton': expected CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}"
        )
    if config.chunk_score != "sum" or config.group_score != "sum":
        raise ValueError(
            f"backend='triton': expected chunk_score='sum' and group_score='sum' (the kernels route by the "
            f"summed summaries only so far), got {config.chunk_score!r} and {config.group_score!r}; "
            "use backend='reference'"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected a contiguous last dim for backend='triton', got strides {t.stride()}"
            )
    return _hga_kernels(q, k, v, config, spec, start_pos, scale=scale)


def _fixed_keys(positions: torch.Tensor, config: HGAConfig) -> torch.Tensor:
    """Keys of the windows and the causal current chunk of each position ``[Lq]``."""
    c = config.chunk_size
    cur = positions // c
    sink_end = cur.clamp(max=config.sink_chunks)
    local_start = torch.maximum(sink_end, cur - config.local_chunks)
    return (sink_end + cur - local_start) * c + positions - cur * c + 1


def prefill_tables(
    group_ids: torch.Tensor, start_pos: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables of :func:`kvtier.kernels.sparse_prefill` from per-query routed groups.

    Parameters
    ----------
    group_ids : Tensor ``[B, Hq, Lq, Kg]`` int64
        Attended global group ids per query (``RoutePlan.group_ids``), -1 padded.

    Returns
    -------
    routed : Tensor ``[B, Hq, NQB, U]`` int32
        Per query block (chunk), the sorted union of its queries' groups, -1 padded.
    num_routed : Tensor ``[B, Hq, NQB]`` int32
    visible : Tensor ``[B, Hq, Lq, U]`` uint8
        1 where the query attends that entry of its block's union.
    """
    b, hq, lq, kg = group_ids.shape
    dev = group_ids.device
    pos = torch.arange(start_pos, start_pos + lq, device=dev)
    qb = pos // chunk_size - start_pos // chunk_size
    nqb = (start_pos + lq - 1) // chunk_size - start_pos // chunk_size + 1
    if kg == 0:
        return (
            torch.full((b, hq, nqb, 1), -1, dtype=torch.int32, device=dev),
            torch.zeros(b, hq, nqb, dtype=torch.int32, device=dev),
            torch.zeros(b, hq, lq, 1, dtype=torch.uint8, device=dev),
        )
    big = 1 << 62
    padded = torch.full((b, hq, nqb, chunk_size, kg), big, dtype=torch.int64, device=dev)
    padded[:, :, qb, pos % chunk_size] = torch.where(group_ids < 0, big, group_ids)
    flat = padded.reshape(b, hq, nqb, chunk_size * kg).sort(dim=-1).values
    dup = torch.zeros_like(flat, dtype=torch.bool)
    dup[..., 1:] = flat[..., 1:] == flat[..., :-1]
    flat = torch.where(dup, big, flat).sort(dim=-1).values
    num = (flat < big).sum(dim=-1)
    u = max(1, int(num.max()))  # one host sync per prefill slice: sizes the tables
    table = flat[..., :u].contiguous()
    idx = torch.searchsorted(table[:, :, qb].contiguous(), group_ids.clamp(min=0).contiguous())
    vis = torch.zeros(b, hq, lq, u + 1, dtype=torch.uint8, device=dev)
    vis.scatter_(3, torch.where(group_ids >= 0, idx, u), 1)
    routed = torch.where(table >= big, -1, table).to(torch.int32)
    return routed, num.to(torch.int32), vis[..., :u]


def _route(
    q: torch.Tensor,
    chunk_summ: torch.Tensor,
    group_summ: torch.Tensor,
    start_pos: int,
    config: HGAConfig,
    widths: tuple[int, int, int],
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    precision: str = "tf32x3",
) -> None:
    """Fill the plan tensors ``out`` (chunk, group, fetch ids and the int32 routed table).

    Chunk scores use three tf32 tensor-core products ("tf32x3", about fp32 accurate): on the
    H200 a 64-query block at 1M tokens routes in 0.69 ms against 1.14 ms with IEEE fp32 dots,
    and the plans agree with the float64 reference on >= 99.5% of rows (gpu test).
    """
    lq = q.shape[2]
    w_last = windows_at(start_pos + lq - 1, config.chunk_size, config.sink_chunks, config.local_chunks)
    if widths[0] == 0 or w_last.num_candidates == 0:
        return  # outputs were created -1 filled
    n = w_last.local_start  # chunks any row can pick lie below this
    rows = q.shape[1] // chunk_summ.shape[1] * lq
    # Many rows per KV head (prefill): 64-row blocks read each summary tile 4x less often than
    # 16-row blocks; narrower tiles keep the [64, block_t] fp32 scores in registers.
    block_r, warps = (64, 8) if rows >= 64 else (16, 4)
    bt, nt, kt = route_chunks_tiles(n, config.top_chunks)
    if block_r == 64 and bt > 128:  # noqa: PLR2004
        bt, nt, kt = route_chunks_tiles(n, config.top_chunks, block_t=128)
    cand = torch.empty(q.shape[0], q.shape[1], lq, nt, kt, dtype=torch.int64, device=q.device)
    route_chunks(
        q,
        chunk_summ[:, :, :n],
        cand,
        start_pos=start_pos,
        chunk_size=config.chunk_size,
        sink_chunks=config.sink_chunks,
        local_chunks=config.local_chunks,
        block_t=bt,
        block_r=block_r,
        num_warps=warps,
        precision=precision,
    )
    route_groups(
        cand,
        q,
        group_summ,
        *out,
        top_chunks=config.top_chunks,
        top_groups=config.top_groups,
        fetch_groups=config.fetch_groups,
    )


def _hga_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: HGAConfig,
    rope: RopeSpec | float,
    start_pos: int,
    summaries: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, HGAStats]:
    """The kernel path; ``summaries`` (chunk, group) may be given when they are kept incrementally.

    ``rope`` is the model's RoPE, or a plain RoPE base.
    """
    b, hq, lq, d = q.shape
    c, g = config.chunk_size, config.group_size
    dev = q.device
    last = start_pos + lq - 1
    n_closed = last // c
    if summaries is None:
        spec = rope if isinstance(rope, RopeSpec) else RopeSpec.plain(d, float(rope))
        chunk_summ, group_summ = routing_summaries_ref(k[:, :, : n_closed * c], config, spec)
    else:
        chunk_summ, group_summ = summaries
    widths = plan_widths(config, last)
    chunk_ids, group_ids, fetch_ids = (
        torch.full((b, hq, lq, w), -1, dtype=torch.int64, device=dev) for w in widths
    )
    routed = torch.full((b, hq, lq, widths[1]), -1, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    geo = dict(chunk_size=c, group_size=g, sink_chunks=config.sink_chunks, local_chunks=config.local_chunks)

    # Slices start on chunk boundaries so that a query block is never split between launches.
    s0 = start_pos
    while s0 <= last:
        s1 = min(last + 1, (s0 // c) * c + _ROWS_PER_SLICE)
        rows = slice(s0 - start_pos, s1 - start_pos)
        sl = tuple(t[:, :, rows] for t in (chunk_ids, group_ids, fetch_ids, routed))
        _route(q[:, :, rows], chunk_summ, group_summ, s0, config, widths, sl)
        if s1 - s0 == 1:
            positions = torch.full((b,), s0, dtype=torch.int32, device=dev)
            max_keys = (config.sink_chunks + config.local_chunks + 1) * c + widths[1] * g
            splits = decode_num_splits(b, hq, max_keys)
            ws = torch.empty(b, hq, splits, d + 2, dtype=torch.float32, device=dev)
            sparse_decode(
                q[:, :, s0 - start_pos], k, v, positions, sl[3][:, :, 0], out[:, :, s0 - start_pos], ws,
                scale=scale, **geo
            )
        else:
            tab, num, vis = prefill_tables(sl[1], s0, c)
            sparse_prefill(q[:, :, rows], k, v, tab, num, vis, out[:, :, rows], start_pos=s0, scale=scale, **geo)
        s0 = s1

    positions = torch.arange(start_pos, last + 1, device=dev)
    keys = _fixed_keys(positions, config)[None, None, :] + g * (group_ids >= 0).sum(dim=-1)
    return out, HGAStats(keys, positions + 1, RoutePlan(chunk_ids, group_ids, fetch_ids))


class HostKVDecode:
    """One layer's HGA decode step with closed chunks in a host slab and an HBM group cache.

    Every call routes the queries (``route_chunks``, ``route_groups``), deduplicates the
    groups the query heads of each KV head ask for and finds them in the cache
    (``assign_groups``), gathers the misses from the host slab (``gather_groups``, zero-copy
    reads when the slab is pinned) and attends (``sparse_decode`` over the device slab).
    Nothing synchronises with the host and nothing is allocated after construction, so a
    step can be captured in a CUDA graph.

    Parameters
    ----------
    host_slab : Tensor ``[S_host, 2, Hkv, C, D]``
        Closed chunks (pinned host memory, or any memory the GPU can read).
    host_slot : Tensor ``[B, N]`` int32 (device)
        Host slab slot of chunk n of batch row b.
    device_slab : Tensor ``[num_hot + B * E / M, 2, Hkv, C, D]`` (device)
        Slots ``[0, num_hot)`` hold the window chunks (sinks, local, current) through
        ``slot_map``; the rest is the group cache, E entries per (batch row, KV head).
    slot_map : Tensor ``[B, N]`` int32 (device)
        Device slab slot of each window chunk.
    chunk_summ, group_summ : Tensor ``[B, Hkv, N, D]``, ``[B, Hkv, N, M, D]`` float32 (device)
    config : HGAConfig
    num_q_heads : int
    num_hot : int
        Device slab slots reserved for window chunks.
    cache_entries : int
        E, a power of two >= ``(Hq / Hkv) * fetch width``.
    """

    def __init__(
        self,
        host_slab: torch.Tensor,
        host_slot: torch.Tensor,
        device_slab: torch.Tensor,
        slot_map: torch.Tensor,
        chunk_summ: torch.Tensor,
        group_summ: torch.Tensor,
        *,
        config: HGAConfig,
        num_q_heads: int,
        position: int,
        num_hot: int,
        cache_entries: int = 1024,
    ) -> None:
        if config.chunk_score != "sum" or config.group_score != "sum":
            raise ValueError(
                f"config: expected chunk_score='sum' and group_score='sum' (the kernels route by the summed "
                f"summaries only so far), got {config.chunk_score!r} and {config.group_score!r}"
            )
        self.config = config
        c, g = config.chunk_size, config.group_size
        m = c // g
        b, hkv, n, d = chunk_summ.shape
        dev = device_slab.device
        if device_slab.shape[0] < num_hot + b * cache_entries // m:
            raise ValueError(
                f"device_slab: expected >= {num_hot + b * cache_entries // m} slots, got {device_slab.shape[0]}"
            )
        self.host_slab, self.host_slot, self.device_slab, self.slot_map = (
            host_slab,
            host_slot,
            device_slab,
            slot_map,
        )
        self.chunk_summ, self.group_summ = chunk_summ, group_summ
        self.position = position
        hq = num_q_heads
        self.widths = plan_widths(config, position)
        kc_w, kg_w, kf_w = self.widths
        w = windows_at(position, c, config.sink_chunks, config.local_chunks)
        self.num_cand_chunks = w.local_start
        self.route_options: dict[str, object] = {}
        self.gather_rows = 1
        self.gather_segmented = False  # measured default: one program per table row
        # The setting the H200 sweep picked most often (1M, batch 1: 54 us against 72 us for
        # IEEE dots on 512-chunk tiles); kvtier bench attention re-tunes it per shape.
        self.set_route_tiles(128, precision="tf32x3", num_warps=4)
        bt, nt, kt = self.tiles
        i32 = dict(dtype=torch.int32, device=dev)
        self.q = torch.zeros(b, hq, 1, d, dtype=device_slab.dtype, device=dev)
        # Room for the smallest tile width (most tiles) the benchmark may choose.
        self.cand = torch.empty(
            b, hq, 1, max(nt, -(-self.num_cand_chunks // 16)), kt, dtype=torch.int64, device=dev
        )
        self.plan = tuple(torch.full((b, hq, 1, w_), -1, dtype=torch.int64, device=dev) for w_ in self.widths)
        self.routed_dense = torch.full((b, hq, 1, kg_w), -1, **i32)
        self.where = torch.empty(b, hkv, n * m, **i32)
        self.tags = torch.empty(b, hkv, cache_entries, **i32)
        self.stamp = torch.empty(b, hkv, cache_entries, **i32)
        self.counter = torch.empty(b, hkv, **i32)
        self.order = torch.empty(b, hkv, cache_entries, **i32)
        self.misses = torch.zeros(b, hkv, **i32)
        rows = 1 << max(0, (hq // hkv * kf_w - 1).bit_length())
        self.table = torch.full((b * hkv * rows, 3), -1, **i32)
        self.routed = torch.full((b, hq, kg_w), -1, **i32)
        self.positions = torch.full((b,), position, **i32)
        self.max_keys = (config.sink_chunks + config.local_chunks + 1) * c + kg_w * g
        self.set_decode_splits(None)
        self.out = torch.empty(b, hq, d, dtype=device_slab.dtype, device=dev)
        self.base_block = num_hot * m
        self.reset_cache()

    @classmethod
    def from_dense(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        config: HGAConfig,
        num_q_heads: int,
        position: int,
        rope_theta: float | None = None,
        rope: RopeSpec | None = None,
        pin: bool = False,
        cache_entries: int = 1024,
        summaries: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> HostKVDecode:
        """Lay dense ``k, v [B, Hkv, Lk, D]`` out as a host slab plus hot device slots.

        Closed chunks before ``position``'s chunk go to the host slab (pinned when ``pin``);
        the window chunks of ``position`` are copied to the device slab. ``summaries``
        default to the reference's, computed from ``k`` with ``rope`` (or plain RoPE of base
        ``rope_theta``).
        """
        b, hkv, lk, d = k.shape
        c, g = config.chunk_size, config.group_size
        m = c // g
        dev = k.device
        n = position // c
        if summaries is None:
            if (rope is None) == (rope_theta is None):
                raise ValueError("rope_theta, rope: expected exactly one of them when summaries are not given")
            spec = rope if rope is not None else RopeSpec.plain(d, float(rope_theta))  # type: ignore[arg-type]
            summaries = routing_summaries_ref(k[:, :, : n * c], config, spec)
        host = torch.empty(max(1, b * n), 2, hkv, c, d, dtype=k.dtype, pin_memory=pin)
        for bi in range(b):
            for j, x in enumerate((k, v)):
                host[bi * n : (bi + 1) * n, j].copy_(x[bi, :, : n * c].reshape(hkv, n, c, d).transpose(0, 1))
        host_slot = torch.arange(b * n, dtype=torch.int32, device=dev).reshape(b, n)
        w = windows_at(position, c, config.sink_chunks, config.local_chunks)
        hot = list(range(w.sink_end)) + list(range(w.local_start, w.current + 1))
        nh = len(hot)
        dslab = torch.zeros(b * nh + b * cache_entries // m, 2, hkv, c, d, dtype=k.dtype, device=dev)
        slot_map = torch.zeros(b, w.current + 1, dtype=torch.int32, device=dev)
        for bi in range(b):
            for i, ch in enumerate(hot):
                rows = min(c, lk - ch * c)
                for j, x in enumerate((k, v)):
                    dslab[bi * nh + i, j, :, :rows].copy_(x[bi, :, ch * c : ch * c + rows])
                slot_map[bi, ch] = bi * nh + i
        return cls(
            host,
            host_slot,
            dslab,
            slot_map,
            *summaries,
            config=config,
            num_q_heads=num_q_heads,
            position=position,
            num_hot=b * nh,
            cache_entries=cache_entries,
        )

    def reset_cache(self) -> None:
        """Forget every cached group (the next step is cold)."""
        for t in (self.where, self.tags, self.stamp):
            t.fill_(-1)
        self.counter.zero_()

    def set_decode_splits(self, num_splits: int | None, block_n: int = 64) -> None:
        """Splits per query of the decode kernel (None: ``decode_num_splits``) and its key tile."""
        b, hq, d = (
            self.out.shape if hasattr(self, "out") else (self.q.shape[0], self.q.shape[1], self.q.shape[3])
        )
        if num_splits is None:
            num_splits = decode_num_splits(b, hq, self.max_keys, block_n=block_n)
        self.block_n = block_n
        self.workspace = torch.empty(b, hq, num_splits, d + 2, dtype=torch.float32, device=self.q.device)

    def set_route_tiles(self, block_t: int | None, group_warps: int = 4, **options: object) -> None:
        """Chunk-routing tile width (None: default), route_chunks options, route_groups warps."""
        self.tiles = route_chunks_tiles(max(1, self.num_cand_chunks), self.config.top_chunks, block_t=block_t)
        self.route_options = dict(options)
        self.group_warps = group_warps

    def route(self) -> None:
        """Routing of ``self.q``: fills ``self.plan`` (chunk, group, fetch ids)."""
        cfg = self.config
        if self.widths[0] == 0:
            return
        bt, nt, kt = self.tiles
        cand = self.cand[:, :, :, :nt, :kt]
        route_chunks(
            self.q,
            self.chunk_summ[:, :, : self.num_cand_chunks],
            cand,
            start_pos=self.position,
            chunk_size=cfg.chunk_size,
            sink_chunks=cfg.sink_chunks,
            local_chunks=cfg.local_chunks,
            block_t=bt,
            **self.route_options,
        )
        route_groups(
            cand,
            self.q,
            self.group_summ,
            *self.plan,
            self.routed_dense,
            top_chunks=cfg.top_chunks,
            top_groups=cfg.top_groups,
            fetch_groups=cfg.fetch_groups,
            num_warps=self.group_warps,
        )

    def assign(self) -> None:
        """Dedup and cache lookup: fills the gather table and the attention block table."""
        cfg = self.config
        assign_groups(
            self.plan[2][:, :, 0],
            self.host_slot,
            self.where,
            self.tags,
            self.stamp,
            self.counter,
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
        if self.gather_segmented:  # copies only the misses of each (b, kvh), counts from assign
            gather_groups(self.host_slab, self.table, self.device_slab, group_size=self.config.group_size,
                          counts=self.misses.view(-1))  # fmt: skip
        else:
            gather_groups(self.host_slab, self.table, self.device_slab, group_size=self.config.group_size,
                          rows_per_program=self.gather_rows)  # fmt: skip

    def attend(self) -> torch.Tensor:
        """Sparse decode attention over the device slab; returns ``[B, Hq, D]``."""
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
        """Route, assign, gather, attend for the queries in ``self.q`` ``[B, Hq, 1, D]``."""
        self.route()
        self.assign()
        self.gather()
        return self.attend()
