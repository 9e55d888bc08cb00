# Chunk routing, stage 2, and group routing: merge the tiles' best chunks, score the groups of
# the chosen chunks, write the RoutePlan rows.
#
# Grid: (B * Hq * Lq,): one program per query row (batch, query head, position).
# Layout: cand [B, Hq, Lq, num_tiles, KT] int64 packed keys from route_chunks;
#   q [B, Hq, Lq, D]; group_summ [B, Hkv, N, M, D] float32;
#   outputs chunk_ids [B, Hq, Lq, Kc_w], group_ids [B, Hq, Lq, Kg_w], fetch_ids [B, Hq, Lq, Kf_w]
#   int64 (-1 padded, best first, RoutePlan semantics) and routed [B, Hq, Lq, Kg_w] int32
#   (group_ids again, the block table of the attention kernels over dense K/V).
# Bytes: reads num_tiles * KT * 8 + Kc * M * D * 4 (+ q) per row: at the defaults
#   (Kc 16, M 4, D 128) 32 KiB of group summaries (x2 with BOUND: [min, max] rows of 2D, scored
#   by Quest's bound as the dot of [min(q,0), max(q,0)] with them); writes (Kc + Kg + Kf) * 8 + Kg * 4.
# Order: chunks by packed key (score, then lower chunk); groups by score, ties to the earlier
#   candidate in (chunk rank, group) order, exactly the reference's stable sort.
# The chosen chunk ids are written to chunk_ids first and read back after a barrier: Triton
#   cannot slice the first Kc lanes out of a sorted vector, memory can.
# Split chunk scores (HGAConfig.chunk_score="a+b"): cand holds a's keys, cand2 b's (same
#   shape); the first ceil(Kc/2) chunks come from cand, the rest from cand2 without those.
# Split group scores (HGAConfig.group_score="sum+bound", SPLIT_GROUPS): rows are [sum, min, max]
#   (3D); both scores are computed, and the plan takes ceil(Kg/2) groups by the sum, the rest of
#   Kg by the bound, then the prefetch groups by the sum, by Kf rounds of max-extraction.
# Rank merge (HGAConfig.group_merge="rank", RANK_GROUPS, with SPLIT_GROUPS's scores): each
#   score's keys are sorted and every candidate's place under each is written to `scratch`
#   ([rows, 2, BLOCK_G] int32: Triton cannot invert a permutation in registers) and read back
#   after a barrier; the groups then sort by (rank sum, lesser rank, candidate), the first Kg
#   attended, and the prefetch is the sum's best of the rest (their places written once more);
#   with group_reserve, r groups by each score's max-extraction come first and the rank sum
#   orders the others.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.kernels.route_chunks import _pack

__all__ = ["route_groups"]


@triton.jit
def _route_groups_kernel(
    # pointers
    cand_ptr,
    cand2_ptr,
    q_ptr,
    gsumm_ptr,
    chunk_out_ptr,
    group_out_ptr,
    fetch_out_ptr,
    routed_out_ptr,
    scratch_ptr,
    # sizes
    num_q,
    num_cand,
    top_chunks,
    top_groups,
    fetch_groups,
    reserve,
    kc_w,
    kg_w,
    kf_w,
    # strides
    stride_cb,
    stride_ch,
    stride_cl,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gm,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_gob,
    stride_goh,
    stride_gol,
    stride_fb,
    stride_fh,
    stride_fl,
    stride_rb,
    stride_rh,
    stride_rl,
    # meta
    NUM_Q_HEADS: tl.constexpr,
    REP: tl.constexpr,
    M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_CAND: tl.constexpr,
    BLOCK_KC: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BOUND: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_GROUPS: tl.constexpr,
    RANK_GROUPS: tl.constexpr,
):
    pid = tl.program_id(0)
    l = (pid % num_q).to(tl.int64)
    bh = pid // num_q
    b = (bh // NUM_Q_HEADS).to(tl.int64)
    hq = (bh % NUM_Q_HEADS).to(tl.int64)
    kvh = hq // REP
    EMPTY: tl.constexpr = -9223372036854775808

    # Merge: the best top_chunks of all tiles' candidates, by repeated max-extraction (top_chunks
    # rounds over num_tiles * KT keys instead of sorting them all).
    offs_c = tl.arange(0, BLOCK_CAND)
    keys = tl.load(
        cand_ptr + b * stride_cb + hq * stride_ch + l * stride_cl + offs_c,
        mask=offs_c < num_cand,
        other=EMPTY,
    )
    chunk_row = chunk_out_ptr + b * stride_ob + hq * stride_oh + l * stride_ol
    if SPLIT:
        keys2 = tl.load(
            cand2_ptr + b * stride_cb + hq * stride_ch + l * stride_cl + offs_c,
            mask=offs_c < num_cand,
            other=EMPTY,
        )
        # Each tile keeps min(KT, its candidates) keys with KT >= min(Kc, tile width), so this
        # is the reference's min(Kc, Ncand) of the row; its first half comes from cand.
        kc = tl.minimum(top_chunks, tl.sum((keys != EMPTY).to(tl.int32), axis=0))
        k1 = (kc + 1) // 2
        for i in range(0, kc_w):
            best = tl.max(tl.where(i < k1, keys, keys2), axis=0)
            chunk = 2147483647 - (best & 0xFFFFFFFF).to(tl.int32)
            chunk = tl.where((best != EMPTY) & (i < kc), chunk, -1)
            tl.store(chunk_row + i, chunk.to(tl.int64))
            # A chosen chunk leaves both lists (the low 32 bits of a key name its chunk).
            keys = tl.where((keys & 0xFFFFFFFF) == (best & 0xFFFFFFFF), EMPTY, keys)
            keys2 = tl.where((keys2 & 0xFFFFFFFF) == (best & 0xFFFFFFFF), EMPTY, keys2)
    else:
        for i in range(0, kc_w):
            best = tl.max(keys, axis=0)
            chunk = 2147483647 - (best & 0xFFFFFFFF).to(tl.int32)
            chunk = tl.where((best != EMPTY) & (i < top_chunks), chunk, -1)
            tl.store(chunk_row + i, chunk.to(tl.int64))
            keys = tl.where(keys == best, EMPTY, keys)
    tl.debug_barrier()

    # Groups of the chosen chunks, candidate j = rank * M + g.
    BLOCK_G: tl.constexpr = BLOCK_KC * M
    j = tl.arange(0, BLOCK_G)
    rank = j // M
    g = j % M
    gchunk = tl.load(chunk_row + rank, mask=rank < tl.minimum(kc_w, top_chunks), other=-1)
    ok = gchunk >= 0
    # D in slices: a [64, 128] fp32 tile of group summaries would hold 64 registers per thread
    # at 4 warps; slices of 32 keep it small and overlap the loads.
    scores = tl.zeros([BLOCK_G], dtype=tl.float32)
    scores2 = tl.zeros([BLOCK_G], dtype=tl.float32)  # the bound, with SPLIT_GROUPS
    g_base = (
        gsumm_ptr
        + b * stride_gb
        + kvh * stride_gh
        + gchunk.to(tl.int64)[:, None] * stride_gn
        + g[:, None] * stride_gm
    )
    q_row = q_ptr + b * stride_qb + hq * stride_qh + l * stride_ql
    for d0 in range(0, HEAD_DIM, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        mask_d = offs_d < HEAD_DIM
        mask = ok[:, None] & mask_d[None, :]
        q = tl.load(q_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        gs = tl.load(g_base + offs_d[None, :], mask=mask, other=0.0)
        if SPLIT_GROUPS:  # [sum, min, max]: the sum's score, and the bound at +HEAD_DIM
            lo = tl.load(g_base + HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
            hi = tl.load(g_base + 2 * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
            scores2 += tl.sum(hi * tl.maximum(q, 0.0)[None, :], axis=1)
            scores2 += tl.sum(lo * tl.minimum(q, 0.0)[None, :], axis=1)
        if BOUND:  # gs holds the minima; the maxima follow at +HEAD_DIM
            hi = tl.load(g_base + HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
            scores += tl.sum(hi * tl.maximum(q, 0.0)[None, :], axis=1)
            q = tl.minimum(q, 0.0)
        scores += tl.sum(gs * q[None, :], axis=1)
    gkeys = tl.where(ok, _pack(scores, j), EMPTY)
    num_ok = tl.sum(ok.to(tl.int32), axis=0)
    n_fetch = tl.minimum(num_ok, fetch_groups)
    n_attend = tl.minimum(num_ok, top_groups)
    fetch_row = fetch_out_ptr + b * stride_fb + hq * stride_fh + l * stride_fl
    group_row = group_out_ptr + b * stride_gob + hq * stride_goh + l * stride_gol
    routed_row = routed_out_ptr + b * stride_rb + hq * stride_rh + l * stride_rl
    if RANK_GROUPS:
        lane = tl.arange(0, BLOCK_G)
        scratch_row = scratch_ptr + pid.to(tl.int64) * (2 * BLOCK_G)
        gkeys2 = tl.where(ok, _pack(scores2, j), EMPTY)
        for slot in tl.static_range(2):  # each candidate's place under the sum (slot 0) and the bound
            ranked = tl.sort(gkeys if slot == 0 else gkeys2, descending=True)
            rj = 2147483647 - (ranked & 0xFFFFFFFF).to(tl.int32)
            tl.store(scratch_row + slot * BLOCK_G + rj, lane, mask=ranked != EMPTY)
        tl.debug_barrier()
        ra = tl.load(scratch_row + j, mask=ok, other=0)
        rb = tl.load(scratch_row + BLOCK_G + j, mask=ok, other=0)
        # group_reserve: r rounds of max-extraction from the sum's keys, then r from the bound's
        # (the loop runs 2 * reserve rounds; those past 2r, when Kg // 2 < reserve, do nothing).
        r = tl.minimum(reserve, n_attend // 2)
        taken = j < 0
        for i in range(0, 2 * reserve):
            active = i < 2 * r
            best = tl.max(tl.where(i < r, gkeys, gkeys2), axis=0)
            bj = tl.where(active, 2147483647 - (best & 0xFFFFFFFF).to(tl.int32), 0)
            bchunk = tl.load(chunk_row + bj // M, mask=active, other=-1)
            gid = bchunk.to(tl.int64) * M + (bj % M)
            tl.store(group_row + i, gid, mask=active & (i < kg_w))
            tl.store(routed_row + i, gid.to(tl.int32), mask=active & (i < kg_w))
            tl.store(fetch_row + i, gid, mask=active & (i < kf_w))
            hit = active & (j == bj)
            taken = taken | hit
            gkeys = tl.where(hit, EMPTY, gkeys)
            gkeys2 = tl.where(hit, EMPTY, gkeys2)
        # Larger keys first: the least (rank sum, lesser rank), then the earlier candidate.
        order = (ra + rb) * BLOCK_G + tl.minimum(ra, rb)
        free = ok & (taken == 0)
        fkeys = tl.where(free, ((1 << 30) - order).to(tl.int64) << 32 | (2147483647 - j).to(tl.int64), EMPTY)
        fkeys = tl.sort(fkeys, descending=True)
        fj = tl.where(fkeys != EMPTY, 2147483647 - (fkeys & 0xFFFFFFFF).to(tl.int32), 0)
        fchunk = tl.load(chunk_row + fj // M, mask=fkeys != EMPTY, other=-1)
        n_ranked = n_attend - 2 * r
        at = 2 * r + lane
        attend = tl.where(lane < n_ranked, fchunk.to(tl.int64) * M + (fj % M), -1)
        tl.store(group_row + at, attend, mask=at < kg_w)
        tl.store(routed_row + at, attend.to(tl.int32), mask=at < kg_w)
        tl.store(fetch_row + at, attend, mask=(lane < n_ranked) & (at < kf_w))
        # The prefetch: the sum's best among the candidates not attended (places in fused order).
        tl.debug_barrier()
        tl.store(scratch_row + fj, lane, mask=fkeys != EMPTY)
        tl.debug_barrier()
        place = tl.load(scratch_row + j, mask=ok, other=BLOCK_G)
        rest = tl.sort(tl.where(free & (place >= n_ranked), gkeys, EMPTY), descending=True)
        sj = tl.where(rest != EMPTY, 2147483647 - (rest & 0xFFFFFFFF).to(tl.int32), 0)
        schunk = tl.load(chunk_row + sj // M, mask=rest != EMPTY, other=-1)
        at = n_attend + lane
        gid = tl.where((rest != EMPTY) & (at < n_fetch), schunk.to(tl.int64) * M + (sj % M), -1)
        tl.store(fetch_row + at, gid, mask=at < kf_w)
    elif SPLIT_GROUPS:
        gkeys2 = tl.where(ok, _pack(scores2, j), EMPTY)
        k1 = (n_attend + 1) // 2
        for i in range(0, kf_w):
            by_sum = (i < k1) | (i >= n_attend)
            best = tl.max(tl.where(by_sum, gkeys, gkeys2), axis=0)
            bj = 2147483647 - (best & 0xFFFFFFFF).to(tl.int32)
            bj = tl.where(best != EMPTY, bj, 0)
            bchunk = tl.load(chunk_row + bj // M)
            gid = tl.where((best != EMPTY) & (i < n_fetch), bchunk.to(tl.int64) * M + (bj % M), -1)
            tl.store(fetch_row + i, gid)
            attend = tl.where(i < n_attend, gid, -1)
            tl.store(group_row + i, attend, mask=i < kg_w)
            tl.store(routed_row + i, attend.to(tl.int32), mask=i < kg_w)
            # A chosen group leaves both lists (the low 32 bits of a key name its candidate).
            gkeys = tl.where((gkeys & 0xFFFFFFFF) == (best & 0xFFFFFFFF), EMPTY, gkeys)
            gkeys2 = tl.where((gkeys2 & 0xFFFFFFFF) == (best & 0xFFFFFFFF), EMPTY, gkeys2)
    else:
        gkeys = tl.sort(gkeys, descending=True)
        # Lane i of the sorted keys is the i-th best group: recover its chunk and group.
        sj = 2147483647 - (gkeys & 0xFFFFFFFF).to(tl.int32)
        sj = tl.where(gkeys != EMPTY, sj, 0)
        schunk = tl.load(chunk_row + sj // M, mask=gkeys != EMPTY, other=-1)
        gid = schunk.to(tl.int64) * M + (sj % M)
        lane = tl.arange(0, BLOCK_G)
        fetch = tl.where(lane < n_fetch, gid, -1)
        attend = tl.where(lane < n_attend, gid, -1)
        tl.store(fetch_row + lane, fetch, mask=lane < kf_w)
        tl.store(group_row + lane, attend, mask=lane < kg_w)
        tl.store(routed_row + lane, attend.to(tl.int32), mask=lane < kg_w)
        # Widths past the candidates (kf_w > Kc * M cannot happen: plan_widths clips them).
        if BLOCK_OUT > BLOCK_G:
            extra = BLOCK_G + tl.arange(0, BLOCK_OUT - BLOCK_G)
            tl.store(fetch_row + extra, -1, mask=extra < kf_w)


def route_groups(
    cand: torch.Tensor,
    q: torch.Tensor,
    group_summ: torch.Tensor,
    chunk_ids: torch.Tensor,
    group_ids: torch.Tensor,
    fetch_ids: torch.Tensor,
    routed: torch.Tensor,
    *,
    top_chunks: int,
    top_groups: int,
    fetch_groups: int,
    num_warps: int = 4,
    group_score: str = "sum",
    group_merge: str = "split",
    group_reserve: int = 0,
    cand2: torch.Tensor | None = None,
) -> None:
    """Finish routing: top chunks from ``cand``, then top groups inside them, per query row.

    Parameters
    ----------
    cand : Tensor ``[B, Hq, Lq, num_tiles, KT]`` int64, contiguous in its last two dims
        From :func:`kvtier.kernels.route_chunks`.
    q : Tensor ``[B, Hq, Lq, D]``, last dim contiguous
    group_summ : Tensor ``[B, Hkv, N, M, D]`` float32, last dim contiguous
    chunk_ids, group_ids, fetch_ids : Tensor ``[B, Hq, Lq, Kc_w | Kg_w | Kf_w]`` int64
        Outputs, widths from :func:`kvtier.reference.plan_widths`; rows of positions with
        fewer candidates are ``-1`` padded, as in :class:`kvtier.reference.RoutePlan`.
    routed : Tensor ``[B, Hq, Lq, Kg_w]`` int32
        Output: ``group_ids`` as int32, the routed block table over dense K/V.
    top_chunks, top_groups, fetch_groups : int
        ``HGAConfig`` budgets.
    group_score : {"sum", "bound", "sum+bound"}
        ``HGAConfig.group_score``: ``group_summ`` rows are summaries ``[B, Hkv, N, M, D]``,
        ``[min, max]`` key bounds (2D, ranked by Quest's bound), or ``[sum, min, max]`` (3D,
        ``ceil(Kg / 2)`` groups by the sum, the rest by the bound, the prefetch by the sum).
    group_merge : {"split", "rank"}
        ``HGAConfig.group_merge``: with ``"sum+bound"``, ``"rank"`` attends the ``Kg`` groups of
        least rank sum under the two scores instead of half by each (a ``[rows, 2, next_pow2(Kc_w) * M]``
        int32 scratch tensor is allocated for the ranks).
    group_reserve : int
        ``HGAConfig.group_reserve``: with ``"rank"``, ``min(group_reserve, Kg // 2)`` groups by
        each score alone first.
    cand2 : Tensor, optional
        For a split chunk score ``"a+b"``: ``route_chunks``' keys of ``b`` (``cand`` holding
        ``a``'s), same shape and strides as ``cand``. The first ``ceil(Kc / 2)`` chunks
        (``Kc = min(top_chunks, candidates)``) are ``a``'s best, the rest ``b``'s best of the others.
    """
    bsz, hq, lq, d = q.shape
    m = group_summ.shape[3]
    hkv = group_summ.shape[1]
    for name, t in (
        ("cand", cand),
        ("q", q),
        ("group_summ", group_summ),
        ("chunk_ids", chunk_ids),
        ("group_ids", group_ids),
        ("fetch_ids", fetch_ids),
        ("routed", routed),
    ):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: expected a contiguous last dim, got strides {t.stride()}")
    if cand.shape[3] > 1 and cand.stride(3) != cand.shape[4]:
        raise ValueError(f"cand: expected tiles contiguous in dims 3 and 4, got strides {cand.stride()}")
    for name, t, dt in (
        ("chunk_ids", chunk_ids, torch.int64),
        ("group_ids", group_ids, torch.int64),
        ("fetch_ids", fetch_ids, torch.int64),
        ("routed", routed, torch.int32),
    ):
        if t.dtype != dt or tuple(t.shape[:3]) != (bsz, hq, lq):
            raise ValueError(f"{name}: expected [{bsz}, {hq}, {lq}, K] {dt}, got {tuple(t.shape)} {t.dtype}")
    kc_w, kg_w, kf_w = chunk_ids.shape[3], group_ids.shape[3], fetch_ids.shape[3]
    if routed.shape[3] != kg_w or max(kg_w, kf_w) > kc_w * m:
        raise ValueError(
            f"group_ids/fetch_ids/routed: expected widths <= Kc_w * M = {kc_w * m}, got {kg_w}, {kf_w}"
        )
    widths = {"sum": 1, "bound": 2, "sum+bound": 3}
    if group_score not in widths:
        raise ValueError(f"group_score: expected one of {tuple(widths)}, got {group_score!r}")
    if group_summ.shape[4] != widths[group_score] * d:
        raise ValueError(
            f"group_summ: expected a last dim of {widths[group_score] * d} (group_score={group_score!r}), "
            f"got {tuple(group_summ.shape)}"
        )
    if group_merge not in ("split", "rank"):
        raise ValueError(f"group_merge: expected 'split' or 'rank', got {group_merge!r}")
    if isinstance(group_reserve, bool) or not isinstance(group_reserve, int) or group_reserve < 0 or (
        group_reserve and group_merge != "rank"
    ):
        raise ValueError(f"group_reserve: expected an int >= 0 (> 0 only with group_merge='rank'), got {group_reserve!r}")
    if group_merge == "rank" and group_score != "sum+bound":
        raise ValueError(f"group_merge='rank': expected group_score='sum+bound' (two rankings), got {group_score!r}")
    if cand2 is not None and (
        not isinstance(cand2, torch.Tensor) or cand2.shape != cand.shape or cand2.stride() != cand.stride()
        or cand2.dtype != cand.dtype
    ):
        got = f"{tuple(cand2.shape)} strides {cand2.stride()}" if isinstance(cand2, torch.Tensor) else type(cand2).__name__
        raise ValueError(f"cand2: expected the shape {tuple(cand.shape)} and strides {cand.stride()} of cand, got {got}")
    num_cand = cand.shape[3] * cand.shape[4]
    block_kc = triton.next_power_of_2(max(1, kc_w))
    block_g = block_kc * m
    rank = group_merge == "rank"
    scratch = torch.empty(bsz * hq * lq * 2 * block_g if rank else 1, dtype=torch.int32, device=q.device)
    _route_groups_kernel[(bsz * hq * lq,)](
        cand,
        cand if cand2 is None else cand2,
        q,
        group_summ,
        chunk_ids,
        group_ids,
        fetch_ids,
        routed,
        scratch,
        lq,
        num_cand,
        top_chunks,
        top_groups,
        fetch_groups,
        group_reserve,
        kc_w,
        kg_w,
        kf_w,
        cand.stride(0),
        cand.stride(1),
        cand.stride(2),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        group_summ.stride(0),
        group_summ.stride(1),
        group_summ.stride(2),
        group_summ.stride(3),
        chunk_ids.stride(0),
        chunk_ids.stride(1),
        chunk_ids.stride(2),
        group_ids.stride(0),
        group_ids.stride(1),
        group_ids.stride(2),
        fetch_ids.stride(0),
        fetch_ids.stride(1),
        fetch_ids.stride(2),
        routed.stride(0),
        routed.stride(1),
        routed.stride(2),
        NUM_Q_HEADS=hq,
        REP=hq // hkv,
        M=m,
        HEAD_DIM=d,
        BLOCK_DK=min(32, triton.next_power_of_2(d)),
        BLOCK_CAND=max(triton.next_power_of_2(num_cand), block_kc),
        BLOCK_KC=block_kc,
        BLOCK_OUT=max(block_g, triton.next_power_of_2(max(1, kf_w))),
        BOUND=group_score == "bound",
        SPLIT=cand2 is not None,
        SPLIT_GROUPS=group_score == "sum+bound",
        RANK_GROUPS=rank,
        num_warps=num_warps,
    )
