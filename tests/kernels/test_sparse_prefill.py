"""sparse_prefill against sparse_prefill_ref: per-query visibility, causal current chunk, slabs."""

from __future__ import annotations

import pytest
import torch

from kvtier.kernels.sparse_prefill import sparse_prefill
from kvtier.layout import windows_at
from kvtier.reference.kernels_ref import sparse_prefill_ref
from tests.kernels._util import assert_close_to_ref

GEO = dict(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2)


def random_tables(bsz, hq, lq, start_pos, width, *, fill=0.6, seed=0):
    """Per block: distinct candidate groups (-1 padded, valid first) and random per-query visibility."""
    gen = torch.Generator().manual_seed(seed)
    c, g = GEO["chunk_size"], GEO["group_size"]
    m = c // g
    first = start_pos // c
    nqb = (start_pos + lq - 1) // c - first + 1
    routed = torch.full((bsz, hq, nqb, width), -1, dtype=torch.int32)
    num = torch.zeros(bsz, hq, nqb, dtype=torch.int32)
    for j in range(nqb):
        w = windows_at((first + j) * c, c, GEO["sink_chunks"], GEO["local_chunks"])
        cand = torch.arange(w.sink_end * m, w.local_start * m, dtype=torch.int32)
        for b in range(bsz):
            for h in range(hq):
                n = min(width, len(cand), int(round(width * fill)))
                routed[b, h, j, :n] = cand[torch.randperm(len(cand), generator=gen)[:n]]
                num[b, h, j] = n
    vis = (torch.rand(bsz, hq, lq, width, generator=gen) < 0.5).to(torch.uint8)
    return routed, num, vis


@pytest.mark.parametrize(
    "dtype,hq,hkv,lq,start_pos,width",
    [
        (torch.float32, 4, 1, 20, 100, 6),  # GQA 4, two blocks, partial first and last chunk
        (torch.float16, 2, 2, 16, 128, 5),  # one whole chunk, MHA
        (torch.float32, 2, 1, 1, 90, 4),  # a single query
        (torch.float16, 4, 4, 5, 0, 3),  # first chunk: no window, no candidates
    ],
)
def test_sparse_prefill_matches_ref(dtype, hq, hkv, lq, start_pos, width):
    torch.manual_seed(5)
    d, bsz = 32, 2
    lk = start_pos + lq  # the last block ends inside its chunk: keys past Lk must not be read
    q = torch.randn(bsz, hq, lq, d, dtype=dtype)
    # K/V are views of longer tensors holding NaN past Lk: reading a key past Lk shows.
    kv = torch.randn(2, bsz, hkv, lk + 16, d, dtype=dtype)
    kv[..., lk:, :] = float("nan")
    k, v = kv[0, :, :, :lk], kv[1, :, :, :lk]
    routed, num, vis = random_tables(bsz, hq, lq, start_pos, width)
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q, k, v, routed, num, vis, out, start_pos=start_pos, block_n=16, **GEO)
    ref = sparse_prefill_ref(q, k, v, start_pos, routed, vis.bool(), **GEO)
    same = sparse_prefill_ref(q, k, v, start_pos, routed, vis.bool(), upcast=False, **GEO)
    assert_close_to_ref(out, ref, same, floor=1e-5 if dtype == torch.float32 else 1e-3)


def test_sparse_prefill_slab():
    torch.manual_seed(6)
    d, hkv, hq, c, g = 32, 2, 4, GEO["chunk_size"], GEO["group_size"]
    m = c // g
    start_pos, lq = 66, 12
    slab = torch.randn(16, 2, hkv, c, d)
    slot_map = torch.randperm(16)[:6].to(torch.int32)[None]
    free = [s for s in range(16) if s not in set(slot_map[0].tolist())]
    blocks = torch.tensor([s * m + gg for s in free for gg in range(m)], dtype=torch.int32)
    routed = blocks[torch.randperm(len(blocks))[:6]].reshape(1, 1, 1, 6).repeat(1, hq, 1, 1).contiguous()
    num = torch.full((1, hq, 1), 6, dtype=torch.int32)
    vis = (torch.rand(1, hq, lq, 6) < 0.5).to(torch.uint8)
    q = torch.randn(1, hq, lq, d)
    out = torch.empty_like(q)
    k, v = slab[:, 0], slab[:, 1]
    sparse_prefill(q, k, v, routed, num, vis, out, start_pos=start_pos, slot_map=slot_map, block_n=32, **GEO)
    ref = sparse_prefill_ref(q, k, v, start_pos, routed, vis.bool(), slot_map=slot_map, **GEO)
    assert_close_to_ref(out, ref, ref)


def test_sparse_prefill_rejects_bad_tables():
    q = torch.randn(1, 2, 4, 16)
    k = torch.randn(1, 1, 40, 16)
    routed = torch.full((1, 2, 1, 3), -1, dtype=torch.int32)
    num = torch.zeros(1, 2, 1, dtype=torch.int32)
    vis = torch.zeros(1, 2, 4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="routed_visible"):
        sparse_prefill(q, k, k, routed, num, vis.bool(), torch.empty_like(q), start_pos=32, **GEO)
    with pytest.raises(ValueError, match="routed"):
        sparse_prefill(q, k, k, routed.long(), num, vis, torch.empty_like(q), start_pos=32, **GEO)
