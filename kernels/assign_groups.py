# Working-set assignment: deduplicate the groups a KV head's query heads ask for, find them in
# the HBM group cache, give each miss a cache entry (least recently used first) and emit the
# gather rows and the attention block table. All on the GPU: no host sync inside a step.
#
# Grid: (B * Hkv,): one program per (batch, KV head) owns that head's cache entries, so no
#   two programs touch the same map or entry; inside it the steps are ordered by barriers.
# Layout (per (b, kvh), E cache entries, NG = N * M group ids):
#   fetch [B, Hq, Kf] int64 requested group ids (-1 none); the first Kg are attended
#   host_slot [B, N] int32 host slab slot of each chunk
#   where [B, Hkv, NG] int32 cache entry holding each group, -1 absent (in/out)
#   tags [B, Hkv, E] int32 group held by each entry, -1 empty (in/out)
#   stamp [B, Hkv, E] int32 last step an entry was used, -1 never (in/out)
#   counter [B, Hkv] int32 step number (in/out, incremented)
#   order [B, Hkv, E] int32 scratch; misses [B, Hkv] int32 out: groups to gather
#   table [B * Hkv * R, 3] int32 out: gather rows (host block, cache block, kvh), R =
#     next_power_of_2(rep * Kf) rows per (b, kvh): its misses first, then rows of -1
#   routed [B, Hq, Kg] int32 out: cache block of each attended group, -1 none
# Cache block of entry e of batch row b: base_block + b * E + e (slot = block // M of the
#   device slab, group = block % M, the head being kvh).
# Bytes: about rep * Kf * 20 + E * 16 per program; negligible next to the gather.
# Dedup: misses claim their map slot with an atomic compare-and-swap, so a group asked for by
#   several query heads (or twice) is fetched once and every asker gets the same entry.

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["assign_groups"]


@triton.jit
def _assign_groups_kernel(
    # pointers
    fetch_ptr,
    host_slot_ptr,
    where_ptr,
    tags_ptr,
    stamp_ptr,
    counter_ptr,
    order_ptr,
    misses_ptr,
    table_ptr,
    routed_ptr,
    # sizes
    base_block,
    num_groups,
    # strides
    stride_fb,
    stride_fh,
    stride_hb,
    stride_rb,
    stride_rh,
    # meta
    NUM_KV_HEADS: tl.constexpr,
    REP: tl.constexpr,
    KF: tl.constexpr,
    KG: tl.constexpr,
    M: tl.constexpr,
    E: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EXTRACT_MAX: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NUM_KV_HEADS
    kvh = pid % NUM_KV_HEADS
    lane = tl.arange(0, BLOCK_R)
    r = lane // KF
    k = lane % KF
    lane_ok = lane < REP * KF
    hq = kvh * REP + r
    gid = tl.load(fetch_ptr + b * stride_fb + hq * stride_fh + k, mask=lane_ok, other=-1).to(tl.int32)
    has = gid >= 0
    gsafe = tl.where(has, gid, 0)

    where_row = where_ptr + pid.to(tl.int64) * num_groups
    tags_row = tags_ptr + pid * E
    stamp_row = stamp_ptr + pid * E
    order_row = order_ptr + pid * E
    step = tl.load(counter_ptr + pid)

    e_old = tl.load(where_row + gsafe, mask=has, other=-1)
    hit = has & (e_old >= 0)
    miss = has & (e_old < 0)
    tl.store(stamp_row + e_old, step, mask=hit)
    # Claim: the first lane to swap -1 for its mark owns the miss; -7 never matches a map value.
    old = tl.atomic_cas(where_row + gsafe, tl.where(miss, -1, -7), -2 - lane)
    winner = miss & (old == -1)
    tl.debug_barrier()

    # Free entries (not used this step), least recently used first. Few misses (a steady
    # decode step has a handful per KV head): extract that many minima; many (a cold step):
    # one bitonic sort of all E entries is cheaper than hundreds of reductions.
    offs_e = tl.arange(0, E)
    st = tl.load(stamp_row + offs_e)
    key = tl.where(st != step, (st.to(tl.int64) << 32) | offs_e.to(tl.int64), 9223372036854775807)
    n_win = tl.sum(winner.to(tl.int32), axis=0)
    if n_win > EXTRACT_MAX:
        key = tl.sort(key)
        tl.store(order_row + offs_e, (key & 0xFFFFFFFF).to(tl.int32))
    else:
        for i in range(0, n_win):
            best = tl.min(key, axis=0)
            tl.store(order_row + i, (best & 0xFFFFFFFF).to(tl.int32))
            key = tl.where(key == best, 9223372036854775807, key)
    tl.debug_barrier()

    rank = tl.cumsum(winner.to(tl.int32), axis=0) - 1
    e_new = tl.load(order_row + rank, mask=winner, other=0)
    old_tag = tl.load(tags_row + e_new, mask=winner, other=-1)
    tl.store(where_row + old_tag, -1, mask=winner & (old_tag >= 0))
    tl.store(tags_row + e_new, gid, mask=winner)
    tl.store(stamp_row + e_new, step, mask=winner)
    tl.debug_barrier()
    tl.store(where_row + gsafe, e_new, mask=winner)
    tl.debug_barrier()

    chunk = gsafe // M
    hslot = tl.load(host_slot_ptr + b * stride_hb + chunk, mask=winner, other=0)
    blocks_b = base_block + b * E
    # Rows are compacted: the misses first (in lane order), then -1 rows, so a gather that is
    # told the count per (b, kvh) reads only the rows it copies.
    blank = table_ptr + (pid * BLOCK_R + lane) * 3  # rows n_win.. : -1 (disjoint from 0..n_win-1)
    tl.store(blank, tl.full([BLOCK_R], -1, tl.int32), mask=lane >= n_win)
    trow = table_ptr + (pid * BLOCK_R + rank) * 3
    tl.store(trow, hslot * M + gsafe % M, mask=winner)
    tl.store(trow + 1, blocks_b + e_new, mask=winner)
    tl.store(trow + 2, tl.zeros_like(lane) + kvh, mask=winner)
    tl.store(misses_ptr + pid, tl.sum(winner.to(tl.int32), axis=0))

    e_now = tl.load(where_row + gsafe, mask=has, other=-1)
    tl.store(
        routed_ptr + b * stride_rb + hq * stride_rh + k,
        tl.where(has, blocks_b + e_now, -1),
        mask=lane_ok & (k < KG),
    )
    tl.store(counter_ptr + pid, step + 1)


def assign_groups(
    fetch: torch.Tensor,
    host_slot: torch.Tensor,
    where: torch.Tensor,
    tags: torch.Tensor,
    stamp: torch.Tensor,
    counter: torch.Tensor,
    order: torch.Tensor,
    misses: torch.Tensor,
    table: torch.Tensor,
    routed: torch.Tensor,
    *,
    group_size: int,
    chunk_size: int,
    base_block: int,
) -> None:
    """Plan one decode step's working set in the HBM group cache (see the file header).

    Parameters
    ----------
    fetch : Tensor ``[B, Hq, Kf]`` int64, last dim contiguous
        Groups each query head wants resident, best first (``RoutePlan.fetch_group_ids``);
        its first ``Kg = routed.shape[2]`` are the attended ones.
    host_slot : Tensor ``[B, N]`` int32
        Host slab slot of each closed chunk.
    where, tags, stamp, counter : Tensor
        Cache state, updated in place: ``[B, Hkv, NG]``, ``[B, Hkv, E]``, ``[B, Hkv, E]`` and
        ``[B, Hkv]`` int32, contiguous. A fresh cache is ``where = tags = stamp = -1`` and
        ``counter = 0``. E must be a power of two >= ``rep * Kf``.
    order : Tensor ``[B, Hkv, E]`` int32 scratch.
    misses : Tensor ``[B, Hkv]`` int32, out: groups this step must gather.
    table : Tensor ``[B * Hkv * R, 3]`` int32, out: gather rows for
        :func:`kvtier.kernels.gather_groups` (host slab to device slab), ``R =
        next_power_of_2(rep * Kf)``.
    routed : Tensor ``[B, Hq, Kg]`` int32, out: device slab block of each attended group.
    group_size, chunk_size : int
    base_block : int
        Block id of entry 0 of batch row 0 in the device slab (entries of row b follow at
        ``base_block + b * E``).
    """
    bsz, hq, kf = fetch.shape
    hkv, e = tags.shape[1], tags.shape[2]
    rep = hq // hkv
    kg = routed.shape[2]
    block_r = triton.next_power_of_2(rep * kf)
    for name, t, shape in (
        ("where", where, (bsz, hkv, where.shape[2])),
        ("tags", tags, (bsz, hkv, e)),
        ("stamp", stamp, (bsz, hkv, e)),
        ("order", order, (bsz, hkv, e)),
        ("counter", counter, (bsz, hkv)),
        ("misses", misses, (bsz, hkv)),
        ("table", table, (bsz * hkv * block_r, 3)),
        ("routed", routed, (bsz, hq, kg)),
        ("host_slot", host_slot, (bsz, host_slot.shape[1])),
    ):
        if t.dtype != torch.int32 or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous int32 tensor of shape {shape}, got {tuple(t.shape)} {t.dtype}"
            )
    if fetch.dtype != torch.int64 or fetch.stride(2) != 1:
        raise ValueError(
            f"fetch: expected int64 with a contiguous last dim, got {fetch.dtype} {fetch.stride()}"
        )
    if e & (e - 1) or e < rep * kf:
        raise ValueError(f"tags: expected a power-of-two number of entries >= rep * Kf = {rep * kf}, got {e}")
    if kg > kf:
        raise ValueError(f"routed: expected Kg <= Kf = {kf}, got {kg}")
    if kf == 0:  # nothing routed (no candidate chunks yet): nothing to gather
        misses.zero_()
        table.fill_(-1)
        return
    _assign_groups_kernel[(bsz * hkv,)](
        fetch,
        host_slot,
        where,
        tags,
        stamp,
        counter,
        order,
        misses,
        table,
        routed,
        base_block,
        where.shape[2],
        fetch.stride(0),
        fetch.stride(1),
        host_slot.stride(0),
        routed.stride(0),
        routed.stride(1),
        NUM_KV_HEADS=hkv,
        REP=rep,
        KF=kf,
        KG=kg,
        M=chunk_size // group_size,
        E=e,
        BLOCK_R=block_r,
        EXTRACT_MAX=32,
        num_warps=4,
    )
