# Sparse decode attention over a block table: one query per (batch, query head).
#
# Grid: (B * Hq, num_splits) for _sparse_decode_kernel, then (B * Hq,) for _combine_kernel.
#   The keys of one query (sinks, local window, current chunk, routed groups; see _blocks.py)
#   are cut into num_splits contiguous ranges of units ("flash-decoding"): at batch 1 and
#   32 query heads one program per head would fill 32 of the H200's 132 SMs.
# Layout: q [B, Hq, D]; K/V dense [B, Hkv, Lk, D] or slab views [S, Hkv, C, D] (any strides,
#   last dim contiguous is fastest); routed [B, Hq, Kg] int32 block ids (-1 = none);
#   workspace [B, Hq, num_splits, D + 2] float32 (per split: m, l, then acc[D]); out [B, Hq, D].
# Bytes: reads ~keys * 2 * D * itemsize per query (K and V rows, each row once per query head;
#   the Hq/Hkv heads of one KV head read the shared window keys through L2), writes
#   B * Hq * num_splits * (D + 2) * 4 + B * Hq * D * itemsize.
# Math: fp32 scores, fp32 online softmax in base 2 (scale folded with log2 e), fp32 P @ V.
#   Inputs of any dtype are converted to fp32 as they are loaded (the interpreter cannot do
#   bf16 arithmetic, and fp32 FMA over D=128 costs nothing next to the loads here).

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.kernels._blocks import _fixed_units, _unit_rows, kv_strides

__all__ = ["sparse_decode", "decode_num_splits"]

_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_decode_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    routed_ptr,
    slot_map_ptr,
    ws_ptr,
    # sizes
    num_routed,
    units_per_split,
    scale_log2,
    # strides
    stride_qb,
    stride_qh,
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
    stride_sm_b,
    stride_wb,
    stride_wh,
    stride_ws,
    # meta
    NUM_Q_HEADS: tl.constexpr,
    REP: tl.constexpr,
    C: tl.constexpr,
    G: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SLOT_MAP: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // NUM_Q_HEADS).to(tl.int64)
    hq = (pid_bh % NUM_Q_HEADS).to(tl.int64)
    kvh = hq // REP
    M: tl.constexpr = C // G
    UNITS: tl.constexpr = BLOCK_N // G

    pos = tl.load(pos_ptr + b)
    num_fixed = _fixed_units(pos, C, G, SINK, LOCAL)
    total = num_fixed + num_routed
    u_begin = pid_s * units_per_split
    u_end = tl.minimum(total, u_begin + units_per_split)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    q = q * scale_log2

    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    routed_row = routed_ptr + b * stride_rb + hq * stride_rh

    m_i = tl.full([], -float("inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for u0 in range(u_begin, u_end, UNITS):
        u = u0 + offs_n // G
        t = offs_n % G
        blk, kpos, valid = _unit_rows(
            u,
            t,
            pos,
            num_fixed,
            u_end,
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
        valid = valid & (kpos <= pos)
        chunk = (blk // M).to(tl.int64)
        row = (blk % M) * G + t
        k_off = chunk * stride_kc + row * stride_kt
        v_off = chunk * stride_vc + row * stride_vt
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        # m_new stays -inf only while no valid key was seen; keep alpha and p finite then.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    ws = ws_ptr + b * stride_wb + hq * stride_wh + pid_s * stride_ws
    tl.store(ws, m_i)
    tl.store(ws + 1, l_i)
    tl.store(ws + 2 + offs_d, acc, mask=mask_d)


@triton.jit
def _combine_kernel(
    # pointers
    ws_ptr,
    out_ptr,
    # sizes
    num_splits,
    # strides
    stride_wb,
    stride_wh,
    stride_ws,
    stride_ob,
    stride_oh,
    # meta
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // NUM_Q_HEADS
    hq = pid_bh % NUM_Q_HEADS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    ws = ws_ptr + b * stride_wb + hq * stride_wh + offs_s * stride_ws
    m = tl.load(ws, mask=mask_s, other=-float("inf"))
    l = tl.load(ws + 1, mask=mask_s, other=0.0)
    acc = tl.load(
        ws[:, None] + 2 + offs_d[None, :], mask=mask_s[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0
    )
    m_all = tl.max(m, axis=0)
    w = tl.where(m == -float("inf"), 0.0, tl.exp2(m - m_all))
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(
        out_ptr + b * stride_ob + hq * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def decode_num_splits(
    batch: int, num_q_heads: int, max_keys: int, *, block_n: int = 64, num_sms: int = 132
) -> int:
    """Splits per query: about 16 programs per SM, at least one key tile each.

    ``max_keys`` bounds the keys of one query (windows + current chunk + routed groups).
    Measured on the H200 at 1216 keys (19 tiles of 64): batch 1 (32 heads) 17.5 us with 19
    splits against 18.6 us with 9; batch 4 33.8 us with 18 against 37.2 us with 9.
    """
    tiles = max(1, -(-max_keys // block_n))
    want = max(1, -(-16 * num_sms // max(1, batch * num_q_heads)))
    return max(1, min(want, tiles, 64))


def _check(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {dtypes}, got {t.dtype}")


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    routed: torch.Tensor,
    out: torch.Tensor,
    workspace: torch.Tensor,
    *,
    chunk_size: int,
    group_size: int,
    sink_chunks: int,
    local_chunks: int,
    slot_map: torch.Tensor | None = None,
    scale: float | None = None,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Exact softmax attention of one query per (batch, query head) over its block table.

    Parameters
    ----------
    q : Tensor ``[B, Hq, D]``, float32, float16 or bfloat16, last dim contiguous
        Query at position ``positions[b]`` (RoPE applied).
    k, v : Tensor, same dtype as ``q``, last dim contiguous
        Dense ``[B, Hkv, Lk, D]`` (key at position p in row p) when ``slot_map`` is None, else
        slab views ``[S, Hkv, C, D]`` (``slab[:, 0]`` and ``slab[:, 1]`` of a
        ``[S, 2, Hkv, C, D]`` slab) shared by the batch.
    positions : Tensor ``[B]`` int32
        Position of each batch row's query; windows follow :func:`kvtier.layout.windows_at`.
    routed : Tensor ``[B, Hq, Kg]`` int32, last dim contiguous
        Block ids of the routed groups of each query (global group ids ``chunk * M + g`` for
        dense K/V, ``slot * M + g`` for a slab), ``-1`` for none. They must not repeat a
        window chunk or each other.
    out : Tensor ``[B, Hq, D]``, dtype of ``q``
        Written in place and returned.
    workspace : Tensor ``[B, Hq, num_splits, D + 2]`` float32, contiguous
        Per-split partial results; its dim 2 sets the number of splits
        (:func:`decode_num_splits` suggests one).
    chunk_size, group_size, sink_chunks, local_chunks : int
        Geometry and windows (``HGAConfig`` fields).
    slot_map : Tensor ``[B, N]`` int32, optional
        Slab slot of each window chunk (sink, local and current chunks) per batch row.
    scale : float, optional
        Softmax scale, ``D ** -0.5`` when None.

    Returns
    -------
    Tensor
        ``out``.
    """
    _check("q", q, 3, (torch.float32, torch.float16, torch.bfloat16))
    bsz, hq, d = q.shape
    slab = slot_map is not None
    for name, t in (("k", k), ("v", v)):
        _check(name, t, 4, (q.dtype,))
        if t.shape[-1] != d or t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected last dim {d} with stride 1, got shape {tuple(t.shape)} strides {t.stride()}"
            )
        if not slab and t.shape[0] != bsz:
            raise ValueError(f"{name}: expected batch {bsz} like q, got {t.shape[0]}")
        if slab and t.shape[2] != chunk_size:
            raise ValueError(f"{name}: expected slab view [S, Hkv, {chunk_size}, D], got {tuple(t.shape)}")
    hkv = k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"k: expected a number of KV heads dividing {hq}, got {hkv}")
    if chunk_size % group_size != 0:
        raise ValueError(f"group_size: expected a divisor of {chunk_size}, got {group_size}")
    if block_n % group_size != 0:
        raise ValueError(f"block_n: expected a multiple of group_size={group_size}, got {block_n}")
    _check("positions", positions, 1, (torch.int32,))
    _check("routed", routed, 3, (torch.int32,))
    if tuple(routed.shape[:2]) != (bsz, hq) or (routed.shape[2] > 0 and routed.stride(2) != 1):
        raise ValueError(
            f"routed: expected [B={bsz}, Hq={hq}, Kg] with a contiguous last dim, got {tuple(routed.shape)}"
        )
    _check("out", out, 3, (q.dtype,))
    if tuple(out.shape) != (bsz, hq, d) or out.stride(-1) != 1:
        raise ValueError(
            f"out: expected shape {(bsz, hq, d)} with a contiguous last dim, got {tuple(out.shape)}"
        )
    _check("workspace", workspace, 4, (torch.float32,))
    if (
        tuple(workspace.shape[:2]) != (bsz, hq)
        or workspace.shape[3] != d + 2
        or not workspace.is_contiguous()
    ):
        raise ValueError(
            f"workspace: expected contiguous [{bsz}, {hq}, splits, {d + 2}], got {tuple(workspace.shape)}"
        )
    if slab:
        _check("slot_map", slot_map, 2, (torch.int32,))
        if slot_map.shape[0] != bsz or slot_map.stride(1) != 1:
            raise ValueError(
                f"slot_map: expected [B={bsz}, N] with a contiguous last dim, got {tuple(slot_map.shape)}"
            )
    num_splits = workspace.shape[2]
    m = chunk_size // group_size
    # Splits are sized for the largest window set any position can have.
    max_units = (sink_chunks + local_chunks + 1) * m + routed.shape[2]
    units_per_split = -(-max_units // num_splits)
    units = block_n // group_size
    units_per_split = -(-units_per_split // units) * units
    skb, skc, skh, skt = kv_strides(k, chunk_size, slab)
    svb, svc, svh, svt = kv_strides(v, chunk_size, slab)
    sm = slot_map if slab else positions  # any int32 tensor; never read without HAS_SLOT_MAP
    block_d = triton.next_power_of_2(d)
    _sparse_decode_kernel[(bsz * hq, num_splits)](
        q,
        k,
        v,
        positions,
        routed,
        sm,
        workspace,
        routed.shape[2],
        units_per_split,
        _LOG2E * (d**-0.5 if scale is None else scale),
        q.stride(0),
        q.stride(1),
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
        sm.stride(0) if slab else 0,
        workspace.stride(0),
        workspace.stride(1),
        workspace.stride(2),
        NUM_Q_HEADS=hq,
        REP=hq // hkv,
        C=chunk_size,
        G=group_size,
        SINK=sink_chunks,
        LOCAL=local_chunks,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        HAS_SLOT_MAP=slab,
        num_warps=num_warps,
    )
    _combine_kernel[(bsz * hq,)](
        workspace,
        out,
        num_splits,
        workspace.stride(0),
        workspace.stride(1),
        workspace.stride(2),
        out.stride(0),
        out.stride(1),
        NUM_Q_HEADS=hq,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=1 if num_splits * block_d <= 1024 else 4,
    )
    return out
