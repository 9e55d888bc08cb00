# Chunk routing, stage 1: score query rows against chunk summaries, keep each tile's best.
#
# Grid: (B * Hkv, cdiv(rep * Lq, BLOCK_R), num_tiles). A program takes BLOCK_R query rows
#   (query head r of KV head kvh at query position l, row = r * Lq + l: GQA rows share the
#   summaries they read) and BLOCK_T consecutive chunks, computes scores with one fp32
#   tl.dot, masks each row to its own candidates [sink_end, local_start) (windows_at of the
#   row's position, so one launch serves rows of different chunks) and writes the row's
#   best min(Kc, BLOCK_T) candidates of the tile, best first, to `cand`.
# Layout: q [B, Hq, Lq, D] (any float dtype); chunk_summ [B, Hkv, N, D] float32;
#   cand [B, Hq, Lq, num_tiles, KT] int64 packed keys (see below).
# Bytes: reads num_tiles * BLOCK_T * D * 4 per (b, kvh, row block) of summaries (at 1M tokens,
#   N = 16384 chunks: 64 MiB per step, the one term of HGA that grows with context) plus
#   q; writes B * Hq * Lq * num_tiles * KT * 8.
# score="max_group" (HGAConfig.chunk_score): a chunk's score is the best of its M group scores,
#   read from group_summ [B, Hkv, N, M, Dg] instead: M times the reads and the dot products
#   (x2 more with bound=True, Dg = 2D: Quest's bound as the dot of [min(q,0), max(q,0)] with
#   the groups' [min, max] keys).
# units=U (HGAConfig.max_group_size): the best of M / U units of U adjacent groups instead, each
#   merged in registers from its groups' rows as it is loaded (minima by min, maxima by max,
#   sums added: merged_group_keys_ref), so the M group rows are read once, as with U = 1.
# Packed key: (order-preserving int32 of the fp32 score) << 32 | (2^31 - 1 - chunk), so one
#   int64 sort orders by score, ties to the lower chunk (the reference's stable sort), and
#   "no candidate" is INT64_MIN. Scores are fp32 with IEEE dots (not tf32, whose 10-bit
#   mantissa would flip near-tied picks against the float64 reference).
# score="running_max" / "running_max_group": a row's score of chunk n is the max of the above
#   over the queries of its own chunk up to it. Rows are then laid out as (query head, offset
#   in one query block), a block being the launch's positions of one chunk, so the max is a
#   scan over the block inside the program; the maxima of the chunk's positions before the
#   launch come from carry_in [B, Hq, >= N] fp32 (keyed by chunk index), and the last
#   query's maxima go to carry_out: + B * Hq * N * 4 bytes read and written.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.kernels._blocks import _windows

__all__ = ["route_chunks", "route_chunks_tiles", "EMPTY_KEY", "SCORES"]

#: Packed key of "no candidate" (sorts after every real one).
EMPTY_KEY = -(2**63)

#: Chunk scores ``route_chunks`` computes (one term of ``HGAConfig.chunk_score`` each).
SCORES = ("sum", "max_group", "running_max", "running_max_group")


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _pack(score, idx):
    """int64 key ordering by fp32 score, then by lower idx (see the header)."""
    bits = score.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)


@triton.jit
def _tile_scores(
    q_base,
    s_base,
    row_ok,
    n_ok,
    HEAD_DIM: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BOUND: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    UNITS: tl.constexpr,
    stride_u,
):
    """[BLOCK_R, BLOCK_T] fp32 scores of query rows against summary rows (q . s, or the min/max bound).

    With ``UNITS > 1`` a summary row is the merge of ``UNITS`` rows ``stride_u`` apart.
    """
    scores = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(q_base + offs_d[None, :], mask=row_ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        mask_s = n_ok[:, None] & mask_d[None, :]
        s_tile = tl.load(s_base + offs_d[None, :], mask=mask_s, other=0.0)
        if BOUND:  # s_tile holds the minima; the maxima follow at +HEAD_DIM
            hi_tile = tl.load(s_base + HEAD_DIM + offs_d[None, :], mask=mask_s, other=0.0)
        for j in tl.static_range(1, UNITS):
            row = s_base + j * stride_u + offs_d[None, :]
            if BOUND:
                s_tile = tl.minimum(s_tile, tl.load(row, mask=mask_s, other=0.0))
                hi_tile = tl.maximum(hi_tile, tl.load(row + HEAD_DIM, mask=mask_s, other=0.0))
            else:
                s_tile += tl.load(row, mask=mask_s, other=0.0)
        if BOUND:
            q_hi = tl.maximum(q, 0.0)
            q = tl.minimum(q, 0.0)
            if USE_DOT:
                scores = tl.dot(q_hi, tl.trans(hi_tile), acc=scores, input_precision=PRECISION)
            else:
                scores += tl.sum(q_hi[:, None, :] * hi_tile[None, :, :], axis=2)
        if USE_DOT:
            scores = tl.dot(q, tl.trans(s_tile), acc=scores, input_precision=PRECISION)
        else:  # few rows (decode: rep of them): FMAs without padding the rows to 16
            scores += tl.sum(q[:, None, :] * s_tile[None, :, :], axis=2)
    return scores


@triton.jit
def _route_chunks_kernel(
    # pointers
    q_ptr,
    summ_ptr,
    cand_ptr,
    carry_in_ptr,
    carry_out_ptr,
    # sizes
    start_pos,
    num_q,
    num_chunks,
    # strides
    stride_qb,
    stride_qh,
    stride_ql,
    stride_sb,
    stride_sh,
    stride_sn,
    stride_sm,
    stride_cb,
    stride_ch,
    stride_cl,
    stride_ct,
    stride_rb,
    stride_rh,
    # meta
    NUM_KV_HEADS: tl.constexpr,
    REP: tl.constexpr,
    C: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    KT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SORT: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    M: tl.constexpr,
    UNITS: tl.constexpr,
    MAX_GROUP: tl.constexpr,
    BOUND: tl.constexpr,
    RUNNING: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
    NUM_HB: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_t = tl.program_id(2)
    b = (pid_bh // NUM_KV_HEADS).to(tl.int64)
    kvh = (pid_bh % NUM_KV_HEADS).to(tl.int64)

    if RUNNING:
        # Row (query head r, offset i in query block qb): a block holds one chunk's positions,
        # so that the running max is a scan along i within the program.
        qb = pid_r // NUM_HB
        i = tl.arange(0, BLOCK_R) % BLOCK_L
        r = (pid_r % NUM_HB) * BLOCK_H + tl.arange(0, BLOCK_R) // BLOCK_L
        qb_first = tl.maximum(start_pos, (start_pos // C + qb) * C) - start_pos
        qb_last = tl.minimum(num_q, (start_pos // C + qb + 1) * C - start_pos) - 1
        l = qb_first + i
        row_ok = (r < REP) & (l <= qb_last)
    else:
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < REP * num_q
        r = rows // num_q
        l = rows % num_q
    hq = kvh * REP + r
    n = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    # D in slices of BLOCK_DK: a [512, 128] fp32 tile would need 256 KiB of shared memory
    # (the H200 has 227 KiB per block); slices also pipeline the summary loads.
    s_base = summ_ptr + b * stride_sb + kvh * stride_sh + n[:, None] * stride_sn
    q_base = q_ptr + b * stride_qb + hq[:, None] * stride_qh + l[:, None] * stride_ql
    if MAX_GROUP:
        scores = tl.full([BLOCK_R, BLOCK_T], float("-inf"), dtype=tl.float32)
        for gi in tl.static_range(M // UNITS):
            scores = tl.maximum(
                scores,
                _tile_scores(q_base, s_base + gi * UNITS * stride_sm, row_ok, n < num_chunks, HEAD_DIM, BLOCK_DK,
                             BLOCK_R, BLOCK_T, BOUND, USE_DOT, PRECISION, UNITS, stride_sm),
            )
    else:
        scores = _tile_scores(q_base, s_base, row_ok, n < num_chunks, HEAD_DIM, BLOCK_DK, BLOCK_R, BLOCK_T,
                              False, USE_DOT, PRECISION, 1, 0)
    if RUNNING:
        if BLOCK_L > 1:  # rows past the block's end come after its rows: they lift none of them
            scores = tl.reshape(scores, [BLOCK_H, BLOCK_L, BLOCK_T])
            scores = tl.reshape(tl.associative_scan(scores, 1, _max), [BLOCK_R, BLOCK_T])
        at = b * stride_rb + hq[:, None] * stride_rh + n[None, :]
        n_ok = row_ok[:, None] & (n < num_chunks)[None, :]
        # Only the first block can continue a chunk begun before this launch (a decode step, or
        # a prefill piece that starts inside a chunk): its earlier positions' maxima.
        cont = (qb == 0) & (start_pos % C != 0)
        scores = tl.maximum(scores, tl.load(carry_in_ptr + at, mask=n_ok & cont, other=float("-inf")))
        # carry_out may be carry_in (one query block: the launcher checks it): every row's read
        # of a (head, chunk) entry comes before the last row's write of it.
        tl.debug_barrier()
        tl.store(carry_out_ptr + at, scores, mask=n_ok & (l == num_q - 1)[:, None])

    sink_end, local_start, cur = _windows(start_pos + l, C, SINK, LOCAL)
    ok = (n[None, :] >= sink_end[:, None]) & (n[None, :] < local_start[:, None]) & row_ok[:, None]
    keys = tl.where(ok, _pack(scores, n[None, :]), -9223372036854775808)
    dst = cand_ptr + b * stride_cb + hq * stride_ch + l * stride_cl + pid_t * stride_ct
    if SORT:
        keys = tl.sort(keys, dim=1, descending=True)
        cols = tl.arange(0, BLOCK_T)
        tl.store(dst[:, None] + cols[None, :], keys, mask=row_ok[:, None] & (cols < KT)[None, :])
    else:
        # KT rounds of "take the row maximum, remove it": 16 reductions over the tile cost less
        # than a bitonic sort of all of it, and keys are unique (chunk index in the low bits).
        for i in tl.static_range(KT):
            best = tl.max(keys, axis=1)
            tl.store(dst + i, best, mask=row_ok)
            keys = tl.where(keys == best[:, None], -9223372036854775808, keys)


def route_chunks_tiles(
    num_chunks: int, top_chunks: int, *, block_t: int | None = None
) -> tuple[int, int, int]:
    """``(block_t, num_tiles, kt)``: tile width, tiles over ``num_chunks`` and keys kept per tile.

    Measured on the H200 (decode, batch 1, 32 query heads, tf32x3 dots, routing total): at
    1M tokens tiles of 128 chunks take 54 us, of 256 56 us, of 512 98 us (4 warps; the
    [16, 512] tile's registers spill); at 128K, 22 / 26 / 45 us. Hence at most 128.
    """
    if block_t is None:
        block_t = min(128, max(16, triton.next_power_of_2(max(1, num_chunks) // 32)))
    num_tiles = max(1, -(-num_chunks // block_t))
    return block_t, num_tiles, max(1, min(top_chunks, block_t))


def route_chunks(
    q: torch.Tensor,
    chunk_summ: torch.Tensor,
    cand: torch.Tensor,
    *,
    start_pos: int,
    chunk_size: int,
    sink_chunks: int,
    local_chunks: int,
    block_t: int,
    block_r: int = 16,
    num_warps: int = 4,
    sort: bool = False,
    use_dot: bool = True,
    precision: str = "ieee",
    score: str = "sum",
    bound: bool = False,
    units: int = 1,
    carry_in: torch.Tensor | None = None,
    carry_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query row's best candidate chunks per tile of ``block_t`` chunks (packed int64 keys).

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]`` float32, float16 or bfloat16, last dim contiguous
        Queries at positions ``start_pos + i`` (RoPE applied).
    chunk_summ : Tensor ``[B, Hkv, N, D]`` float32, last dim contiguous
        Chunk summaries of the closed chunks (at least every candidate of the last query);
        with ``score="max_group"`` the group summaries ``[B, Hkv, N, M, Dg]`` instead.
    cand : Tensor ``[B, Hq, Lq, num_tiles, KT]`` int64, last dim contiguous
        Output: per tile, the best ``KT`` packed keys best first, ``EMPTY_KEY`` padded.
        ``(block_t, num_tiles, KT)`` come from :func:`route_chunks_tiles`.
    start_pos, chunk_size, sink_chunks, local_chunks : int
        Position of the first query and the window geometry (``HGAConfig``).
    block_t : int
        Chunks per tile, a power of two >= 16.
    sort : bool
        Select each tile's best with one bitonic sort instead of KT max-extractions (kept
        for the benchmark's comparison).
    use_dot, precision : bool, str
        Scores by ``tl.dot`` (rows padded to 16) with ``input_precision`` "ieee" (fp32 FMA)
        or "tf32x3" (three tf32 tensor-core products, about fp32 accurate), or by FMAs with
        ``block_r`` rows (no padding; for decode, ``block_r = rep``).
    score : {"sum", "max_group", "running_max", "running_max_group"}
        One term of ``HGAConfig.chunk_score``: ``q . S_c``, the best group score of the chunk,
        or the running max of either over the queries of the row's own chunk up to the row.
    bound : bool
        With ``"max_group"`` / ``"running_max_group"``: the group rows are ``[min, max]`` key
        bounds (``Dg = 2D``, ``HGAConfig.group_score="bound"``) scored by Quest's bound.
    units : int
        With a max_group score: a chunk ranks by the best of its ``M / units`` units of
        ``units`` adjacent groups (``HGAConfig.groups_per_max_group``), merged as
        :func:`kvtier.reference.merged_group_keys_ref` merges them; ``units`` must divide M.
    carry_in, carry_out : Tensor ``[B, Hq, >= N]`` float32, last dim contiguous
        Running scores only: the maxima, per chunk index, over the positions of the first
        query's chunk before ``start_pos`` (read only when ``start_pos`` is inside a chunk);
        ``carry_out`` receives the maxima over the last query's chunk up to it. The same
        tensor may be both when the queries lie in one chunk (a decode step).

    Returns
    -------
    Tensor
        ``cand``.
    """
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    max_group = score.endswith("max_group")
    running = score.startswith("running_")
    if bound and not max_group:
        raise ValueError(f"bound: expected a max_group score (chunk summaries have no bound), got score={score!r}")
    if not isinstance(units, int) or units < 1 or (units > 1 and not max_group):
        raise ValueError(f"units: expected 1, or a positive int with a max_group score, got {units!r} with score={score!r}")
    summ_nd = 5 if max_group else 4
    for name, t, nd in (("q", q, 4), ("chunk_summ", chunk_summ, summ_nd), ("cand", cand, 5)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != nd:
            raise ValueError(f"{name}: expected {nd} dimensions, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dim, got strides {t.stride()}")
    bsz, hq, lq, d = q.shape
    hkv, n = chunk_summ.shape[1], chunk_summ.shape[2]
    if chunk_summ.dtype != torch.float32 or cand.dtype != torch.int64:
        raise TypeError(
            f"chunk_summ, cand: expected float32 and int64, got {chunk_summ.dtype} and {cand.dtype}"
        )
    dg = 2 * d if bound else d
    if chunk_summ.shape[0] != bsz or chunk_summ.shape[-1] != dg or hq % hkv != 0:
        want = f"N, M, {dg}" if max_group else f"N, D={d}"
        raise ValueError(f"chunk_summ: expected [B={bsz}, Hkv | {hq}, {want}], got {tuple(chunk_summ.shape)}")
    num_tiles, kt = cand.shape[3], cand.shape[4]
    if tuple(cand.shape[:3]) != (bsz, hq, lq) or num_tiles * block_t < n or kt > block_t:
        raise ValueError(
            f"cand: expected [B, Hq, Lq, >= {-(-n // block_t)}, <= {block_t}], got {tuple(cand.shape)}"
        )
    if max_group and chunk_summ.shape[3] % units:
        raise ValueError(f"units: expected a divisor of the {chunk_summ.shape[3]} groups per chunk, got {units}")
    rep = hq // hkv
    num_qb = (start_pos + lq - 1) // chunk_size - start_pos // chunk_size + 1
    if running:
        _check_carry(carry_in, carry_out, bsz, hq, n, num_qb)
        # Rows of one program: BLOCK_H query heads x BLOCK_L positions of one query block.
        block_l = triton.next_power_of_2(min(chunk_size, lq))
        block_h = min(triton.next_power_of_2(rep), max(1, block_r // block_l))
        if use_dot:
            block_h = max(block_h, 16 // block_l)
        block_r = block_h * block_l
        num_hb = triton.cdiv(rep, block_h)
        grid = (bsz * hkv, num_hb * num_qb, num_tiles)
    else:
        if carry_in is not None or carry_out is not None:
            raise ValueError(f"carry_in, carry_out: expected None for score={score!r} (no running max), got a tensor")
        carry_in = carry_out = cand  # never read
        block_h = block_l = num_hb = 1
        if use_dot:
            block_r = max(16, min(block_r, triton.next_power_of_2(rep * lq)))
        else:
            block_r = min(block_r, triton.next_power_of_2(rep * lq))
        grid = (bsz * hkv, triton.cdiv(rep * lq, block_r), num_tiles)
    assert carry_in is not None and carry_out is not None
    _route_chunks_kernel[grid](
        q,
        chunk_summ,
        cand,
        carry_in,
        carry_out,
        start_pos,
        lq,
        n,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        chunk_summ.stride(0),
        chunk_summ.stride(1),
        chunk_summ.stride(2),
        chunk_summ.stride(3) if max_group else 0,
        cand.stride(0),
        cand.stride(1),
        cand.stride(2),
        cand.stride(3),
        carry_out.stride(0) if running else 0,
        carry_out.stride(1) if running else 0,
        NUM_KV_HEADS=hkv,
        REP=rep,
        C=chunk_size,
        SINK=sink_chunks,
        LOCAL=local_chunks,
        KT=kt,
        HEAD_DIM=d,
        BLOCK_DK=min(32, max(16, triton.next_power_of_2(d))) if use_dot else 8,
        BLOCK_R=block_r,
        BLOCK_T=block_t,
        SORT=sort,
        USE_DOT=use_dot,
        PRECISION=precision,
        M=chunk_summ.shape[3] if max_group else 1,
        UNITS=units,
        MAX_GROUP=max_group,
        BOUND=bound,
        RUNNING=running,
        BLOCK_H=block_h,
        BLOCK_L=block_l,
        NUM_HB=num_hb,
        num_warps=num_warps,
    )
    return cand


def _check_carry(
    carry_in: torch.Tensor | None, carry_out: torch.Tensor | None, bsz: int, hq: int, n: int, num_qb: int
) -> None:
    """Running scores: carry_in and carry_out ``[B, Hq, >= N]`` float32 with the same strides."""
    for name, t in (("carry_in", carry_in), ("carry_out", carry_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a float32 tensor [B, Hq, >= N] for a running score, got {type(t).__name__}")
        if t.dtype != torch.float32 or t.dim() != 3 or tuple(t.shape[:2]) != (bsz, hq) or t.shape[2] < n:
            raise ValueError(f"{name}: expected [{bsz}, {hq}, >= {n}] float32, got {tuple(t.shape)} {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dim, got strides {t.stride()}")
    assert carry_in is not None and carry_out is not None
    if carry_in.stride() != carry_out.stride():
        raise ValueError(f"carry_out: expected the strides of carry_in {carry_in.stride()}, got {carry_out.stride()}")
    if num_qb > 1 and carry_in.data_ptr() == carry_out.data_ptr():
        # Programs of different query blocks run in any order: one's write would race the first's read.
        raise ValueError(f"carry_out: expected a tensor other than carry_in for queries over {num_qb} chunks, got the same")
