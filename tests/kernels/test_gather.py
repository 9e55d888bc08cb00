"""gather_groups (bit-exact against gather_groups_ref) and assign_groups (dedup, hits, LRU)."""

from __future__ import annotations

import pytest
import torch

from kvtier.kernels.assign_groups import assign_groups
from kvtier.kernels.gather_groups import gather_groups
from kvtier.reference.kernels_ref import gather_groups_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_groups_bit_exact(dtype):
    torch.manual_seed(7)
    g, c, hkv, d = 4, 16, 2, 32
    m = c // g
    src = torch.randn(6, 2, hkv, c, d).to(dtype)
    dst = torch.randn(5, 2, hkv, c, d).to(dtype)
    table = torch.tensor(
        [
            [3 * m + 1, 0 * m + 2, 1],
            [-1, 4 * m + 0, 0],
            [5 * m + 3, 4 * m + 3, 0],
            [0, 1, 1],
            [2 * m + 2, 2 * m + 2, 0],
        ],
        dtype=torch.int32,
    )
    want = gather_groups_ref(src, table, dst, group_size=g)
    gather_groups(src, table, dst, group_size=g, rows_per_program=2)
    assert torch.equal(
        dst.view(torch.int16 if dtype != torch.float32 else torch.int32),
        want.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


def test_gather_groups_strided_destination_and_empty_table():
    g, c, hkv, d = 4, 8, 1, 16
    src = torch.randn(3, 2, hkv, c, d)
    big = torch.zeros(4, 2, 2 * hkv, c, d)
    dst = big[:, :, :hkv]  # a strided view: only head 0 of a two-head slab
    table = torch.tensor([[5, 2, 0]], dtype=torch.int32)
    want = gather_groups_ref(src, table, dst, group_size=g)
    gather_groups(src, table, dst, group_size=g)
    assert torch.equal(dst, want)
    assert (big[:, :, hkv:] == 0).all()
    gather_groups(src, table[:0], dst, group_size=g)
    with pytest.raises(ValueError, match="table"):
        gather_groups(src, table.long(), dst, group_size=g)


class _Cache:
    def __init__(self, bsz, hkv, ng, e):
        self.where = torch.full((bsz, hkv, ng), -1, dtype=torch.int32)
        self.tags = torch.full((bsz, hkv, e), -1, dtype=torch.int32)
        self.stamp = torch.full((bsz, hkv, e), -1, dtype=torch.int32)
        self.counter = torch.zeros(bsz, hkv, dtype=torch.int32)
        self.order = torch.empty(bsz, hkv, e, dtype=torch.int32)
        self.misses = torch.empty(bsz, hkv, dtype=torch.int32)


def _step(cache, fetch, host_slot, kg, *, g, c, base_block):
    bsz, hq, kf = fetch.shape
    hkv = cache.tags.shape[1]
    r = 1 << max(0, (hq // hkv * kf - 1).bit_length())
    table = torch.empty(bsz * hkv * r, 3, dtype=torch.int32)
    routed = torch.empty(bsz, hq, kg, dtype=torch.int32)
    assign_groups(
        fetch,
        host_slot,
        cache.where,
        cache.tags,
        cache.stamp,
        cache.counter,
        cache.order,
        cache.misses,
        table,
        routed,
        group_size=g,
        chunk_size=c,
        base_block=base_block,
    )
    return table, routed


@pytest.mark.parametrize("hq,hkv,kf,kg,e", [(4, 2, 5, 3, 16), (8, 1, 8, 4, 64)])  # few misses; > 32 misses
def test_assign_groups_dedups_hits_and_gathers_the_right_bytes(hq, hkv, kf, kg, e):
    torch.manual_seed(8)
    bsz, g, c, d, n = 2, 4, 16, 8, 12
    m = c // g
    host = torch.randn(n * bsz, 2, hkv, c, d)
    host_slot = torch.stack([torch.randperm(n * bsz)[:n] for _ in range(bsz)]).to(torch.int32)
    hot_slots = 2
    dev = torch.zeros(hot_slots + bsz * e // m, 2, hkv, c, d)
    cache = _Cache(bsz, hkv, n * m, e)
    fetch = torch.randint(0, n * m, (bsz, hq, kf))
    fetch[0, 1] = fetch[0, 0]  # two heads of KV head 0 ask for the same groups
    fetch[1, 3, 4] = -1
    for step in range(3):
        table, routed = _step(cache, fetch, host_slot, kg, g=g, c=c, base_block=hot_slots * m)
        rows = table[table[:, 0] >= 0]
        seg = table.view(bsz * hkv, -1, 3)
        for s_, cnt in enumerate(cache.misses.view(-1).tolist()):  # compacted: misses first
            assert (seg[s_, :cnt, 0] >= 0).all() and (seg[s_, cnt:, 0] == -1).all()
        if step == 0:
            for b in range(bsz):
                for h in range(hkv):
                    rep = hq // hkv
                    want = fetch[b, h * rep : (h + 1) * rep].flatten()
                    assert int(cache.misses[b, h]) == len(set(want[want >= 0].tolist()))
        else:
            assert rows.shape[0] == 0 and int(cache.misses.sum()) == 0  # same request: all hits
        # No destination block of one head is written twice in a step.
        keys = [(int(x[1]), int(x[2])) for x in rows]
        assert len(keys) == len(set(keys))
        if step % 2:  # the segmented gather copies the same rows as one program per row
            gather_groups(
                host, table, dev, group_size=g, counts=cache.misses.view(-1), programs_per_segment=2
            )
        else:
            gather_groups(host, table, dev, group_size=g)
        for b in range(bsz):
            for h in range(hq):
                kvh = h // (hq // hkv)
                for j in range(kg):
                    gid = int(fetch[b, h, j])
                    if gid < 0:
                        assert int(routed[b, h, j]) == -1
                        continue
                    blk = int(routed[b, h, j])
                    hs, hg = int(host_slot[b, gid // m]), gid % m
                    got = dev[blk // m, :, kvh, (blk % m) * g : (blk % m + 1) * g]
                    assert torch.equal(got, host[hs, :, kvh, hg * g : (hg + 1) * g])
    # A new request evicts least recently used entries only, and keeps the map consistent.
    fetch2 = torch.randint(0, n * m, (bsz, hq, kf))
    table, routed = _step(cache, fetch2, host_slot, kg, g=g, c=c, base_block=hot_slots * m)
    for b in range(bsz):
        for h in range(hkv):
            held = cache.tags[b, h]
            for ent, gid in enumerate(held.tolist()):
                if gid >= 0:
                    assert int(cache.where[b, h, gid]) == ent
            assert int((cache.where[b, h] >= 0).sum()) == int((held >= 0).sum())
