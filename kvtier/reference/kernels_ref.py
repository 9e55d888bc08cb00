"""References of the Triton kernels in ``kvtier.kernels``: plain loops over the same inputs.

Each ``<op>_ref`` takes the arguments of the kernel launcher ``<op>`` (without the output and
workspace buffers) and returns what the kernel must write. The block-table addressing they
share is spelled out in :func:`block_rows_ref`; routing has no separate reference here: its
kernels are tested against the plan of :func:`kvtier.reference.hga_attention` itself.
"""

from __future__ import annotations

import math

import torch

from kvtier.layout import windows_at

__all__ = [
    "block_rows_ref",
    "window_blocks_ref",
    "sparse_decode_ref",
    "sparse_prefill_ref",
    "gather_groups_ref",
]


def block_rows_ref(
    x: torch.Tensor, b: int, kvh: int, blk: int, *, chunk_size: int, group_size: int, slab: bool
) -> torch.Tensor:
    """The ``group_size`` rows ``[G, D]`` of block ``blk`` of KV head ``kvh``.

    Dense ``x [B, Hkv, Lk, D]``: blk is the global group id ``chunk * M + g`` of batch row b.
    Slab view ``x [S, Hkv, C, D]``: blk is ``slot * M + g``, shared by the batch.
    """
    m = chunk_size // group_size
    chunk, g = divmod(blk, m)
    if slab:
        return x[chunk, kvh, g * group_size : (g + 1) * group_size]
    start = chunk * chunk_size + g * group_size
    rows = x[b, kvh, start : start + group_size]
    # The current chunk's last group may run past Lk: pad with zeros, masked as future keys.
    return torch.nn.functional.pad(rows, (0, 0, 0, group_size - rows.shape[0]))


def window_blocks_ref(
    position: int,
    b: int,
    *,
    chunk_size: int,
    group_size: int,
    sink_chunks: int,
    local_chunks: int,
    slot_map: torch.Tensor | None,
) -> list[tuple[int, int]]:
    """``(block id, first key position)`` of the window units a query at ``position`` attends.

    Sinks, local window, then the current chunk's groups up to the query; window chunks are
    mapped to slab slots through ``slot_map [B, N]`` when given.
    """
    m = chunk_size // group_size
    w = windows_at(position, chunk_size, sink_chunks, local_chunks)
    chunks = list(range(w.sink_end)) + list(range(w.local_start, w.current))
    units = [(c, g) for c in chunks for g in range(m)]
    units += [(w.current, g) for g in range((position - w.current * chunk_size) // group_size + 1)]
    out = []
    for c, g in units:
        slot = int(slot_map[b, c]) if slot_map is not None else c
        out.append((slot * m + g, c * chunk_size + g * group_size))
    return out


def _attend(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, visible: torch.Tensor, upcast: bool
) -> torch.Tensor:
    """Softmax attention of ``q [Lq, D]`` over ``keys/vals [Lk, D]`` where ``visible [Lq, Lk]``."""
    dt = torch.float32 if upcast else q.dtype
    scores = (q.to(dt) @ keys.to(dt).T) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(dt)
    return (p @ vals.to(dt)).to(q.dtype)


def _attend_blocks(
    q_row: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    b: int,
    kvh: int,
    blocks: list[tuple[int, int]],
    pos: int,
    geo: dict,
    upcast: bool,
) -> torch.Tensor:
    """One query row ``[D]`` over the listed blocks ``(block id, first position or -1 if routed)``.

    Window blocks carry their first position so that the causal part of the current chunk
    masks keys after ``pos``; routed blocks (-1) are always before the query's chunk.
    """
    group_size = geo["group_size"]
    ks = torch.cat([block_rows_ref(k, b, kvh, blk, **geo) for blk, _ in blocks])
    vs = torch.cat([block_rows_ref(v, b, kvh, blk, **geo) for blk, _ in blocks])
    kpos = torch.cat(
        [torch.arange(p0, p0 + group_size) if p0 >= 0 else torch.full((group_size,), -1) for _, p0 in blocks]
    )
    return _attend(q_row[None], ks, vs, (kpos <= pos)[None, :], upcast)[0]


def sparse_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    routed: torch.Tensor,
    *,
    chunk_size: int,
    group_size: int,
    sink_chunks: int,
    local_chunks: int,
    slot_map: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """What :func:`kvtier.kernels.sparse_decode` writes: ``[B, Hq, D]`` in ``q.dtype``.

    ``upcast=False`` computes scores and ``P @ V`` in the input dtype (softmax in float32),
    the yardstick of torch's own rounding error in that dtype.
    """
    bsz, hq, d = q.shape
    rep = hq // k.shape[1]
    slab = slot_map is not None
    geo = dict(chunk_size=chunk_size, group_size=group_size, slab=slab)
    out = torch.empty_like(q)
    for b in range(bsz):
        pos = int(positions[b])
        fixed = window_blocks_ref(
            pos,
            b,
            chunk_size=chunk_size,
            group_size=group_size,
            sink_chunks=sink_chunks,
            local_chunks=local_chunks,
            slot_map=slot_map,
        )
        for h in range(hq):
            kvh = h // rep
            blocks = [(blk, p0) for blk, p0 in fixed] + [(int(x), -1) for x in routed[b, h] if int(x) >= 0]
            out[b, h] = _attend_blocks(q[b, h], k, v, b, kvh, blocks, pos, geo, upcast)
    return out


def sparse_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_pos: int,
    routed: torch.Tensor,
    routed_visible: torch.Tensor,
    *,
    chunk_size: int,
    group_size: int,
    sink_chunks: int,
    local_chunks: int,
    slot_map: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """What :func:`kvtier.kernels.sparse_prefill` writes: ``[B, Hq, Lq, D]`` in ``q.dtype``.

    Query ``i`` is at position ``start_pos + i``; query block ``j`` holds the queries of the
    j-th chunk the positions touch. ``routed [B, Hq, NQB, U]`` lists each block's routed
    block ids (-1 = none) and ``routed_visible [B, Hq, Lq, U]`` says which of its block's
    entries each query attends; windows and the causal current chunk are as in decode.
    """
    bsz, hq, lq, d = q.shape
    rep = hq // k.shape[1]
    slab = slot_map is not None
    geo = dict(chunk_size=chunk_size, group_size=group_size, slab=slab)
    first_chunk = start_pos // chunk_size
    out = torch.empty_like(q)
    for b in range(bsz):
        for i in range(lq):
            pos = start_pos + i
            qb = pos // chunk_size - first_chunk
            fixed = window_blocks_ref(
                pos,
                b,
                chunk_size=chunk_size,
                group_size=group_size,
                sink_chunks=sink_chunks,
                local_chunks=local_chunks,
                slot_map=slot_map,
            )
            for h in range(hq):
                kvh = h // rep
                blocks = list(fixed) + [
                    (int(x), -1)
                    for x, vis in zip(routed[b, h, qb], routed_visible[b, h, i])
                    if int(x) >= 0 and bool(vis)
                ]
                out[b, h, i] = _attend_blocks(q[b, h, i], k, v, b, kvh, blocks, pos, geo, upcast)
    return out


def gather_groups_ref(
    src: torch.Tensor, table: torch.Tensor, dst: torch.Tensor, *, group_size: int
) -> torch.Tensor:
    """What :func:`kvtier.kernels.gather_groups` does to ``dst``, on a copy that is returned.

    ``src [S, 2, Hkv, C, D]`` and ``dst [S', 2, Hkv, C, D]`` are slabs. Row
    ``(src_block, dst_block, kvh)`` of ``table [n, 3]`` int32 copies K and V of head ``kvh``,
    group ``src_block % M`` of slot ``src_block // M`` to the same head, group
    ``dst_block % M`` of slot ``dst_block // M`` (M = C / group_size). Rows whose
    ``src_block`` is negative are skipped.
    """
    out = dst.clone()
    m = src.shape[3] // group_size
    for src_blk, dst_blk, kvh in table.tolist():
        if src_blk < 0:
            continue
        s_slot, s_g = divmod(src_blk, m)
        d_slot, d_g = divmod(dst_blk, m)
        rows = src[s_slot, :, kvh, s_g * group_size : (s_g + 1) * group_size]
        out[d_slot, :, kvh, d_g * group_size : (d_g + 1) * group_size] = rows.to(out.device)
    return out
