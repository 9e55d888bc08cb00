# Group gather: copy 16-token groups of one KV head (K and V) between chunk slabs.
#
# Grid: (cdiv(n, ROWS),): a program copies ROWS table rows. The source may be a pinned host
#   slab: the GPU then reads it over PCIe through unified addressing ("zero-copy"), and many
#   small programs keep enough reads in flight to fill the link (one cudaMemcpyAsync per
#   group reaches 0.3 to 0.6 GB/s on the H200 machine; loads from a kernel 44 to 51 GB/s).
# Layout: src [S, 2, Hkv, C, D], dst [S', 2, Hkv, C, D] (any strides, D contiguous), viewed as
#   integers of the element width so the copy is bit-exact whatever the dtype; table [n, 3]
#   int32 rows (src_block, dst_block, kvh), block = slot * M + group; src_block < 0 = skip.
# Bytes: reads and writes 2 * G * D * itemsize per copied row (8 KiB at G=16, D=128, bf16)
#   plus 12 bytes of table per row.
# Segmented variant (`counts` given): grid (num_segments, P); the table holds num_segments
#   segments of R rows, the first counts[s] of each to copy, and P programs stride over
#   them. A steady decode step copies a handful of groups per KV head out of R = 256 rows:
#   one program per row launches 2,048 programs at batch 1 that mostly exit.

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_groups"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _gather_groups_kernel(
    # pointers
    src_ptr,
    dst_ptr,
    table_ptr,
    # sizes
    num_rows,
    # strides
    stride_s_slot,
    stride_s_kv,
    stride_s_head,
    stride_s_tok,
    stride_d_slot,
    stride_d_kv,
    stride_d_head,
    stride_d_tok,
    # meta
    M: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_td = (offs_t[:, None] < G) & (offs_d[None, :] < HEAD_DIM)
    for i in tl.static_range(ROWS):
        row = pid * ROWS + i
        in_range = row < num_rows
        src_blk = tl.load(table_ptr + row * 3, mask=in_range, other=-1)
        if src_blk >= 0:
            dst_blk = tl.load(table_ptr + row * 3 + 1)
            kvh = tl.load(table_ptr + row * 3 + 2).to(tl.int64)
            s_off = (src_blk // M).to(tl.int64) * stride_s_slot + kvh * stride_s_head
            s_off += ((src_blk % M) * G + offs_t)[:, None] * stride_s_tok + offs_d[None, :]
            d_off = (dst_blk // M).to(tl.int64) * stride_d_slot + kvh * stride_d_head
            d_off += ((dst_blk % M) * G + offs_t)[:, None] * stride_d_tok + offs_d[None, :]
            k = tl.load(src_ptr + s_off, mask=mask_td)
            v = tl.load(src_ptr + s_off + stride_s_kv, mask=mask_td)
            tl.store(dst_ptr + d_off, k, mask=mask_td)
            tl.store(dst_ptr + d_off + stride_d_kv, v, mask=mask_td)


@triton.jit
def _copy_row(
    src_ptr,
    dst_ptr,
    table_ptr,
    row,
    stride_s_slot,
    stride_s_kv,
    stride_s_head,
    stride_s_tok,
    stride_d_slot,
    stride_d_kv,
    stride_d_head,
    stride_d_tok,
    M: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy K and V of table row `row` (skipped when its source block is negative)."""
    offs_t = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_td = (offs_t[:, None] < G) & (offs_d[None, :] < HEAD_DIM)
    src_blk = tl.load(table_ptr + row * 3)
    if src_blk >= 0:
        dst_blk = tl.load(table_ptr + row * 3 + 1)
        kvh = tl.load(table_ptr + row * 3 + 2).to(tl.int64)
        s_off = (src_blk // M).to(tl.int64) * stride_s_slot + kvh * stride_s_head
        s_off += ((src_blk % M) * G + offs_t)[:, None] * stride_s_tok + offs_d[None, :]
        d_off = (dst_blk // M).to(tl.int64) * stride_d_slot + kvh * stride_d_head
        d_off += ((dst_blk % M) * G + offs_t)[:, None] * stride_d_tok + offs_d[None, :]
        k = tl.load(src_ptr + s_off, mask=mask_td)
        v = tl.load(src_ptr + s_off + stride_s_kv, mask=mask_td)
        tl.store(dst_ptr + d_off, k, mask=mask_td)
        tl.store(dst_ptr + d_off + stride_d_kv, v, mask=mask_td)


@triton.jit
def _gather_segments_kernel(
    # pointers
    src_ptr,
    dst_ptr,
    table_ptr,
    counts_ptr,
    # sizes
    segment_rows,
    # strides
    stride_s_slot,
    stride_s_kv,
    stride_s_head,
    stride_s_tok,
    stride_d_slot,
    stride_d_kv,
    stride_d_head,
    stride_d_tok,
    # meta
    M: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PROGRAMS: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_p = tl.program_id(1)
    count = tl.minimum(tl.load(counts_ptr + seg), segment_rows)
    for i in range(pid_p, count, PROGRAMS):
        _copy_row(
            src_ptr,
            dst_ptr,
            table_ptr,
            seg * segment_rows + i,
            stride_s_slot,
            stride_s_kv,
            stride_s_head,
            stride_s_tok,
            stride_d_slot,
            stride_d_kv,
            stride_d_head,
            stride_d_tok,
            M,
            G,
            BLOCK_G,
            HEAD_DIM,
            BLOCK_D,
        )


def gather_groups(
    src: torch.Tensor,
    table: torch.Tensor,
    dst: torch.Tensor,
    *,
    group_size: int,
    rows_per_program: int = 1,
    num_warps: int = 4,
    counts: torch.Tensor | None = None,
    programs_per_segment: int = 32,
) -> torch.Tensor:
    """Copy the K and V of one KV head's group per table row from ``src`` to ``dst``, bit-exact.

    Parameters
    ----------
    src : Tensor ``[S, 2, Hkv, C, D]``
        Source slab: device memory, or pinned host memory (read by the GPU over PCIe).
        Last dim contiguous.
    table : Tensor ``[n, 3]`` int32, contiguous, on the device of ``dst``
        Rows ``(src_block, dst_block, kvh)``; ``block = slot * (C // group_size) + group``.
        Rows with a negative ``src_block`` are skipped. Destinations must not repeat.
    dst : Tensor ``[S', 2, Hkv, C, D]``, dtype of ``src``, last dim contiguous
        Destination slab, written in place and returned.
    group_size : int
        Tokens per group; divides C.
    counts : Tensor ``[num_segments]`` int32, optional
        Segmented mode: the table is ``num_segments`` segments of equal length whose first
        ``counts[s]`` rows are copied (the layout :func:`kvtier.kernels.assign_groups` writes,
        with its ``misses`` as counts); ``programs_per_segment`` programs stride over each.

    Returns
    -------
    Tensor
        ``dst``.
    """
    for name, t in (("src", src), ("dst", dst)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[1] != 2 or t.stride(-1) != 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name}: expected a slab [S, 2, Hkv, C, D] with a contiguous last dim, got {got}"
            )
    if src.dtype != dst.dtype or src.shape[2:] != dst.shape[2:]:
        raise ValueError(
            f"dst: expected [*, {', '.join(map(str, src.shape[1:]))}] {src.dtype} like src, "
            f"got {tuple(dst.shape)} {dst.dtype}"
        )
    c, d = src.shape[3], src.shape[4]
    if c % group_size != 0:
        raise ValueError(f"group_size: expected a divisor of C={c}, got {group_size}")
    if table.dtype != torch.int32 or table.dim() != 2 or table.shape[1] != 3 or not table.is_contiguous():
        raise ValueError(
            f"table: expected a contiguous [n, 3] int32 tensor, got {tuple(table.shape)} {table.dtype}"
        )
    if table.shape[0] == 0:
        return dst
    ity = _INT_VIEW[src.element_size()]
    src_i, dst_i = src.view(ity), dst.view(ity)
    strides = (
        src_i.stride(0), src_i.stride(1), src_i.stride(2), src_i.stride(3),
        dst_i.stride(0), dst_i.stride(1), dst_i.stride(2), dst_i.stride(3),
    )  # fmt: skip
    meta = dict(M=c // group_size, G=group_size, BLOCK_G=triton.next_power_of_2(group_size), HEAD_DIM=d,
                BLOCK_D=triton.next_power_of_2(d))  # fmt: skip
    if counts is not None:
        nseg = counts.numel()
        if counts.dtype != torch.int32 or not counts.is_contiguous() or nseg == 0 or table.shape[0] % nseg:
            raise ValueError(
                f"counts: expected a contiguous int32 tensor whose length divides the {table.shape[0]} "
                f"table rows, got {tuple(counts.shape)} {counts.dtype}"
            )
        _gather_segments_kernel[(nseg, programs_per_segment)](
            src_i, dst_i, table, counts, table.shape[0] // nseg, *strides,
            **meta, PROGRAMS=programs_per_segment, num_warps=num_warps,
        )  # fmt: skip
        return dst
    rows = rows_per_program
    _gather_groups_kernel[(triton.cdiv(table.shape[0], rows),)](
        src_i,
        dst_i,
        table,
        table.shape[0],
        src_i.stride(0),
        src_i.stride(1),
        src_i.stride(2),
        src_i.stride(3),
        dst_i.stride(0),
        dst_i.stride(1),
        dst_i.stride(2),
        dst_i.stride(3),
        M=c // group_size,
        G=group_size,
        BLOCK_G=triton.next_power_of_2(group_size),
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        ROWS=rows,
        num_warps=num_warps,
    )
    return dst
