# Shared device helpers of the sparse attention kernels: where a key of a query's block table lives.
#
# A query at position `pos` (chunk `cur = pos // C`) attends, in this order, "units" of G
# tokens (G = group size, M = C / G units per chunk):
#   sink units      chunks [0, sink_end)                 all M groups of each
#   local units     chunks [local_start, cur)             all M groups of each
#   current units   chunk cur, groups 0 .. (pos % C) // G  causal: key position <= pos
#   routed units    one block id per routed group, read from a table (-1 = none)
# (sink_end, local_start, cur) come from kvtier.layout.windows_at, recomputed here from `pos`.
#
# A "block id" addresses G tokens of one KV head in the K/V source:
#   element = base + (blk // M) * stride_chunk + kvh * stride_head
#             + ((blk % M) * G + t) * stride_tok + d * stride_d
# Dense K/V [B, Hkv, Lk, D]: blk = global group id (chunk * M + g), stride_chunk = C * stride_tok
#   and the batch offset b * stride_batch is added by the caller.
# Slab K/V [S, 2, Hkv, C, D] viewed as K = slab[:, 0], V = slab[:, 1]: blk = slot * M + g,
#   stride_chunk = slab slot stride, batch stride 0; window chunks map to slots through a
#   [B, N] chunk -> slot table.

import triton
import triton.language as tl


@triton.jit
def _windows(pos, C: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr):
    """(sink_end, local_start, current) of kvtier.layout.windows_at for a query at `pos`."""
    cur = pos // C
    sink_end = tl.minimum(cur, SINK)
    local_start = tl.maximum(sink_end, cur - LOCAL)
    return sink_end, local_start, cur


@triton.jit
def _fixed_units(pos, C: tl.constexpr, G: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr):
    """Units before the routed ones: sinks, local window and the current chunk up to `pos`."""
    sink_end, local_start, cur = _windows(pos, C, SINK, LOCAL)
    M: tl.constexpr = C // G
    return (sink_end + cur - local_start) * M + (pos - cur * C) // G + 1


@triton.jit
def _unit_rows(
    u,
    t,
    pos_hi,
    num_fixed,
    num_units,
    b,
    routed_ptr,
    slot_map_ptr,
    stride_sm_b,
    C: tl.constexpr,
    G: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    HAS_SLOT_MAP: tl.constexpr,
):
    """Block id, key position (-1 for routed keys) and validity of unit `u`, token `t` (vectors).

    `pos_hi` is the last query position that shares these windows (the block's last row);
    `routed_ptr` points at this query's (or block's) routed table row (contiguous); `num_fixed`
    is _fixed_units(pos_hi) and units at or past `num_units` are invalid. Routed keys are
    always before the current chunk, so they carry no causal mask; fixed keys carry their
    position for it.
    """
    M: tl.constexpr = C // G
    sink_end, local_start, cur = _windows(pos_hi, C, SINK, LOCAL)
    is_fixed = u < num_fixed
    n_sink = sink_end * M
    chunk = tl.where(u < n_sink, u // M, local_start + (u - n_sink) // M)
    g = u % M
    kpos = chunk * C + g * G + t
    if HAS_SLOT_MAP:
        slot = tl.load(slot_map_ptr + b * stride_sm_b + chunk, mask=is_fixed & (u < num_units), other=0)
    else:
        slot = chunk
    in_range = u < num_units
    routed = tl.load(routed_ptr + (u - num_fixed), mask=(u >= num_fixed) & in_range, other=-1)
    blk = tl.where(is_fixed, slot * M + g, routed)
    valid = (is_fixed | (routed >= 0)) & in_range
    blk = tl.where(valid, blk, 0)
    kpos = tl.where(is_fixed, kpos, -1)
    return blk, kpos, valid


def kv_strides(k, chunk_size: int, slab: bool) -> tuple[int, int, int, int]:
    """(stride_batch, stride_chunk, stride_head, stride_tok) of a dense or a slab K/V view."""
    if slab:  # [S, Hkv, C, D]: slot ids are shared by the batch
        return 0, k.stride(0), k.stride(1), k.stride(2)
    return k.stride(0), chunk_size * k.stride(2), k.stride(1), k.stride(2)  # [B, Hkv, Lk, D]
