"""sparse_decode against sparse_decode_ref: dense and slab K/V, GQA, empty routed sets, splits."""

from __future__ import annotations

import pytest
import torch

from kvtier.kernels.sparse_decode import decode_num_splits, sparse_decode
from kvtier.reference.kernels_ref import sparse_decode_ref
from tests.kernels._util import assert_close_to_ref, random_routed

GEO = dict(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2)


def _run(q, k, v, pos, routed, splits, slot_map=None, block_n=16):
    bsz, hq, d = q.shape
    out = torch.full_like(q, float("nan"))
    ws = torch.empty(bsz, hq, splits, d + 2, dtype=torch.float32, device=q.device)
    return sparse_decode(q, k, v, pos, routed, out, ws, slot_map=slot_map, block_n=block_n, **GEO)


@pytest.mark.parametrize(
    "dtype,hq,hkv,positions,width,splits",
    [
        (torch.float32, 4, 1, [150], 6, 3),  # GQA 4, several splits
        (torch.float16, 4, 4, [150, 77], 6, 2),  # MHA, batch 2, partial last chunk
        (torch.float32, 8, 1, [200], 0, 1),  # GQA 8, no routed table at all
        (torch.float16, 2, 2, [0, 17], 4, 2),  # first position (one key) and an empty routed set
        (torch.float32, 4, 2, [95], 5, 4),  # current chunk full up to its last key
    ],
)
def test_sparse_decode_matches_ref(dtype, hq, hkv, positions, width, splits):
    torch.manual_seed(0)
    d = 32
    lk = max(positions) + 1
    bsz = len(positions)
    q = torch.randn(bsz, hq, d, dtype=dtype)
    k = torch.randn(bsz, hkv, lk, d, dtype=dtype)
    v = torch.randn(bsz, hkv, lk, d, dtype=dtype)
    pos = torch.tensor(positions, dtype=torch.int32)
    routed = random_routed(positions, hq, width, fill=0.7, **GEO)
    out = _run(q, k, v, pos, routed, splits)
    ref = sparse_decode_ref(q, k, v, pos, routed, **GEO)
    same = sparse_decode_ref(q, k, v, pos, routed, upcast=False, **GEO)
    assert_close_to_ref(out, ref, same)


def test_sparse_decode_slab_and_noncontiguous():
    """Slab K/V views with a window slot map, and a non-contiguous query."""
    torch.manual_seed(1)
    d, hkv, hq, c, g = 32, 2, 4, GEO["chunk_size"], GEO["group_size"]
    m = c // g
    pos_list = [130, 100]
    n_chunks = 9
    slab = torch.randn(20, 2, hkv, c, d)
    # Window chunks of each batch row live in shuffled slots; routed blocks point anywhere.
    slot_map = torch.stack([torch.randperm(20)[:n_chunks] for _ in pos_list]).to(torch.int32)
    routed = torch.randint(0, 20 * m, (2, hq, 5), dtype=torch.int32)
    for b in range(2):  # keep routed blocks distinct per head and off the window slots
        for h in range(hq):
            free = [x for x in range(20) if x not in set(slot_map[b].tolist())]
            blocks = torch.tensor([s * m + gg for s in free for gg in range(m)])
            routed[b, h] = blocks[torch.randperm(len(blocks))[:5]].to(torch.int32)
    routed[1, 2, 3:] = -1
    qs = torch.randn(2, 2 * hq, d)[:, ::2]  # non-contiguous: head stride 2 * D
    k, v = slab[:, 0], slab[:, 1]
    pos = torch.tensor(pos_list, dtype=torch.int32)
    out = _run(qs, k, v, pos, routed, 3, slot_map=slot_map, block_n=32)
    ref = sparse_decode_ref(qs, k, v, pos, routed, slot_map=slot_map, **GEO)
    assert_close_to_ref(out, ref, ref)


def test_sparse_decode_strided_query_and_out():
    """q and out as strided views of [B, Hq, Lq=1, D] tensors with a head stride of 2*D."""
    torch.manual_seed(2)
    d = 16
    big_q = torch.randn(1, 4, 2, d)
    q = big_q[:, :, 1]
    k = torch.randn(1, 2, 70, d)
    v = torch.randn(1, 2, 70, d)
    pos = torch.tensor([69], dtype=torch.int32)
    routed = random_routed([69], 4, 3, **GEO)
    out_big = torch.zeros(1, 4, 2, d)
    ws = torch.empty(1, 4, 2, d + 2)
    sparse_decode(q, k, v, pos, routed, out_big[:, :, 0], ws, **GEO)
    ref = sparse_decode_ref(q, k, v, pos, routed, **GEO)
    assert_close_to_ref(out_big[:, :, 0], ref, ref)
    assert (out_big[:, :, 1] == 0).all()


def test_sparse_decode_rejects_bad_inputs():
    q = torch.randn(1, 4, 16)
    k = torch.randn(1, 2, 40, 16)
    pos = torch.tensor([39], dtype=torch.int32)
    routed = torch.full((1, 4, 2), -1, dtype=torch.int32)
    ws = torch.empty(1, 4, 1, 18)
    with pytest.raises(TypeError, match="expected dtype"):
        sparse_decode(q, k.half(), k.half(), pos, routed, torch.empty_like(q), ws, **GEO)
    with pytest.raises(ValueError, match="workspace"):
        sparse_decode(q, k, k, pos, routed, torch.empty_like(q), torch.empty(1, 4, 1, 16), **GEO)
    with pytest.raises(ValueError, match="routed"):
        sparse_decode(q, k, k, pos, routed[:, :2], torch.empty_like(q), ws, **GEO)


def test_decode_num_splits_fills_the_chip():
    assert decode_num_splits(1, 32, 1216) >= 8
    assert decode_num_splits(4, 32, 1216) >= 2
    assert decode_num_splits(1, 32, 16) == 1
    assert 12 <= decode_num_splits(4, 32, 1216) <= 19
