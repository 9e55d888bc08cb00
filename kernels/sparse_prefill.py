# Sparse prefill attention for blocks of up to one chunk of queries, per-position visibility.
#
# Grid: (B * Hq, NQB): one program per (batch, query head, query block); block j holds the
#   queries of the j-th chunk that positions start_pos .. start_pos + Lq - 1 touch (<= C rows,
#   the first and last possibly partial). Every query of a block shares its windows
#   (kvtier.layout.windows_at depends on the chunk only); the current chunk is causal per row.
# Layout: q [B, Hq, Lq, D]; K/V dense [B, Hkv, Lk, D] or slab views [S, Hkv, C, D] (see
#   _blocks.py); routed [B, Hq, NQB, U] int32 block ids of the block's routed groups (the union
#   over its queries, -1 padded), num_routed [B, Hq, NQB] int32 (entries to scan),
#   routed_vis [B, Hq, Lq, U] uint8 (query i attends entry u of its block);
#   out [B, Hq, Lq, D].
# Bytes: per program reads (window keys + U * G) * 2 * D * itemsize of K/V, Lq_block * U bytes
#   of visibility and the block's queries; writes the block's outputs.
# Math: QK^T and PV on tensor cores in the input dtype for fp16/bf16 (fp32 accumulate, P
#   rounded to the input dtype as flash attention does), IEEE fp32 dots for fp32 inputs;
#   softmax in fp32, base 2.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.kernels._blocks import _fixed_units, _unit_rows, kv_strides

__all__ = ["sparse_prefill"]

_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_prefill_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    routed_ptr,
    num_routed_ptr,
    vis_ptr,
    slot_map_ptr,
    out_ptr,
    # sizes
    start_pos,
    num_q,
    scale_log2,
    # strides
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kc,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vc,
    stride_vh,
    stride_vt,
    stride_rb,
    stride_rh,
    stride_rj,
    stride_nb,
    stride_nh,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_sm_b,
    stride_ob,
    stride_oh,
    stride_ol,
    # meta
    NUM_Q_HEADS: tl.constexpr,
    REP: tl.constexpr,
    C: tl.constexpr,
    G: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SLOT_MAP: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = (pid_bh // NUM_Q_HEADS).to(tl.int64)
    hq = (pid_bh % NUM_Q_HEADS).to(tl.int64)
    kvh = hq // REP
    M: tl.constexpr = C // G
    UNITS: tl.constexpr = BLOCK_N // G

    chunk = start_pos // C + pid_j
    lo = tl.maximum(start_pos, chunk * C)
    hi = tl.minimum(start_pos + num_q - 1, chunk * C + C - 1)
    offs_m = tl.arange(0, BLOCK_M)
    pos_m = lo + offs_m
    row_ok = pos_m <= hi
    l_m = (pos_m - start_pos).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + hq * stride_qh + l_m[:, None] * stride_ql + offs_d[None, :],
        mask=row_ok[:, None] & mask_d[None, :],
        other=0.0,
    )
    if IS_FP32:
        q = q.to(tl.float32)

    num_fixed = _fixed_units(hi, C, G, SINK, LOCAL)
    n_routed = tl.load(num_routed_ptr + b * stride_nb + hq * stride_nh + pid_j)
    total = num_fixed + n_routed
    routed_row = routed_ptr + b * stride_rb + hq * stride_rh + pid_j * stride_rj
    vis_rows = vis_ptr + b * stride_xb + hq * stride_xh + l_m * stride_xl
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for u0 in range(0, total, UNITS):
        u = u0 + offs_n // G
        t = offs_n % G
        blk, kpos, valid = _unit_rows(
            u,
            t,
            hi,
            num_fixed,
            total,
            b,
            routed_row,
            slot_map_ptr,
            stride_sm_b,
            C,
            G,
            SINK,
            LOCAL,
            HAS_SLOT_MAP,
        )
        # Keys past the block's last query may lie past Lk: never load them (they would be masked
        # anyway, but garbage V times p = 0 is NaN when the garbage is Inf or NaN).
        valid = valid & (kpos <= hi)
        kc = (blk // M).to(tl.int64)
        kr = (blk % M) * G + t
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(
            k_base + (kc * stride_kc + kr * stride_kt)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
        )
        if IS_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        is_routed = u >= num_fixed
        vis = tl.load(
            vis_rows[:, None] + (u - num_fixed)[None, :],
            mask=row_ok[:, None] & (is_routed & valid)[None, :],
            other=0,
        )
        see = (
            valid[None, :]
            & row_ok[:, None]
            & (kpos[None, :] <= pos_m[:, None])
            & ((vis != 0) | ~is_routed[None, :])
        )
        s = tl.where(see, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + (kc * stride_vc + kr * stride_vt)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
        )
        if IS_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + b * stride_ob + hq * stride_oh + l_m[:, None] * stride_ol + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & mask_d[None, :],
    )


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routed: torch.Tensor,
    num_routed: torch.Tensor,
    routed_visible: torch.Tensor,
    out: torch.Tensor,
    *,
    start_pos: int,
    chunk_size: int,
    group_size: int,
    sink_chunks: int,
    local_chunks: int,
    slot_map: torch.Tensor | None = None,
    scale: float | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Exact softmax attention of query blocks over their windows and per-query routed groups.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]`` float32, float16 or bfloat16, last dim contiguous
        Queries at positions ``start_pos .. start_pos + Lq - 1`` (RoPE applied).
    k, v : Tensor, dtype of ``q``, last dim contiguous
        Dense ``[B, Hkv, Lk, D]`` when ``slot_map`` is None, else slab views ``[S, Hkv, C, D]``.
    routed : Tensor ``[B, Hq, NQB, U]`` int32, last dim contiguous
        Per query block, the block ids of the routed groups any of its queries attends
        (-1 padded); NQB is the number of chunks the positions touch.
    num_routed : Tensor ``[B, Hq, NQB]`` int32, last dim contiguous
        Entries of ``routed`` to scan (valid entries first).
    routed_visible : Tensor ``[B, Hq, Lq, U]`` uint8, last dim contiguous
        1 where query i attends entry u of its block's ``routed`` row.
    out : Tensor ``[B, Hq, Lq, D]``, dtype of ``q``, last dim contiguous
        Written in place and returned.
    start_pos, chunk_size, group_size, sink_chunks, local_chunks : int
        First position and geometry (``HGAConfig``).
    slot_map : Tensor ``[B, N]`` int32, optional
        Slab slot of each window chunk per batch row.
    scale : float, optional
        Softmax scale, ``D ** -0.5`` when None.

    Returns
    -------
    Tensor
        ``out``.
    """
    if q.dim() != 4 or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"q: expected [B, Hq, Lq, D] float32/float16/bfloat16, got {tuple(q.shape)} {q.dtype}"
        )
    bsz, hq, lq, d = q.shape
    slab = slot_map is not None
    c = chunk_size
    nqb = (start_pos + lq - 1) // c - start_pos // c + 1
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.dtype != q.dtype or t.shape[-1] != d or t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected 4 dims, dtype {q.dtype}, last dim {d} contiguous, got "
                f"{tuple(t.shape)} {t.dtype}"
            )
    if q.stride(-1) != 1 or hq % k.shape[1] != 0:
        raise ValueError(
            f"q: expected a contiguous last dim and Hq divisible by Hkv={k.shape[1]}, got {tuple(q.shape)}"
        )
    if routed.dtype != torch.int32 or tuple(routed.shape[:3]) != (bsz, hq, nqb):
        raise ValueError(
            f"routed: expected [{bsz}, {hq}, {nqb}, U] int32, got {tuple(routed.shape)} {routed.dtype}"
        )
    u_w = routed.shape[3]
    if (
        num_routed.dtype != torch.int32
        or tuple(num_routed.shape) != (bsz, hq, nqb)
        or num_routed.stride(2) != 1
    ):
        raise ValueError(f"num_routed: expected [{bsz}, {hq}, {nqb}] int32, got {tuple(num_routed.shape)}")
    if routed_visible.dtype != torch.uint8 or tuple(routed_visible.shape) != (bsz, hq, lq, u_w):
        raise ValueError(
            f"routed_visible: expected [{bsz}, {hq}, {lq}, {u_w}] uint8, got "
            f"{tuple(routed_visible.shape)} {routed_visible.dtype}"
        )
    if u_w > 1 and (routed.stride(3) != 1 or routed_visible.stride(3) != 1):
        raise ValueError("routed, routed_visible: expected a contiguous last dim")
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    skb, skc, skh, skt = kv_strides(k, c, slab)
    svb, svc, svh, svt = kv_strides(v, c, slab)
    sm = slot_map if slab else num_routed
    block_m = max(16, triton.next_power_of_2(min(c, lq)))
    _sparse_prefill_kernel[(bsz * hq, nqb)](
        q,
        k,
        v,
        routed,
        num_routed,
        routed_visible,
        sm,
        out,
        start_pos,
        lq,
        _LOG2E * (d**-0.5 if scale is None else scale),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        skb,
        skc,
        skh,
        skt,
        svb,
        svc,
        svh,
        svt,
        routed.stride(0),
        routed.stride(1),
        routed.stride(2),
        num_routed.stride(0),
        num_routed.stride(1),
        routed_visible.stride(0),
        routed_visible.stride(1),
        routed_visible.stride(2),
        sm.stride(0) if slab else 0,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        NUM_Q_HEADS=hq,
        REP=hq // k.shape[1],
        C=c,
        G=group_size,
        SINK=sink_chunks,
        LOCAL=local_chunks,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_SLOT_MAP=slab,
        IS_FP32=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
