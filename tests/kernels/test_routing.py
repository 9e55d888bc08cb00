"""route_chunks + route_groups against the RoutePlan of the HGA reference (exact ids)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtier.attention import kernel_chunk_table
from kvtier.config import HGAConfig
from kvtier.kernels.route_chunks import route_chunks, route_chunks_tiles
from kvtier.kernels.route_groups import route_groups
from kvtier.reference import (
    hga_attention,
    hga_decode_ref,
    merged_group_keys_ref,
    plan_widths,
    rope_inv_freq,
    routing_summaries_ref,
)
from kvtier.layout import windows_at

CFG = HGAConfig(  # the default routing scores (split at both levels) at a small geometry
    chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=3, top_groups=5, fetch_groups=8
)
PAPER = dataclasses.replace(CFG, chunk_score="sum", group_score="sum")
# max_group over units of two groups: of the bounds (the default's scores), and of summed summaries
UNITS = dataclasses.replace(CFG, group_size=2, max_group_size=4, top_groups=10, fetch_groups=16)
UNITS_SUM = dataclasses.replace(UNITS, chunk_score="max_group", group_score="sum", max_group_size=8)
RANK = dataclasses.replace(CFG, group_merge="rank")  # the groups of least rank sum under the sum and the bound
RESERVE = dataclasses.replace(RANK, group_reserve=1)  # one by each score first, then the rank sum
THETA = 1e4


def kernel_plan(q, k, cfg, start_pos, block_t=None, **options):
    """RoutePlan tensors of the routing kernels for queries at start_pos .. start_pos + Lq - 1."""
    bsz, hq, lq, d = q.shape
    c = cfg.chunk_size
    last = start_pos + lq - 1
    n = last // c
    inv = rope_inv_freq(d, THETA)
    cs, gs = routing_summaries_ref(k[:, :, : n * c], cfg, inv)
    kc_w, kg_w, kf_w = plan_widths(cfg, last)
    bt, nt, kt = route_chunks_tiles(n, cfg.top_chunks, block_t=block_t)
    cands = []
    for term in cfg.chunk_score_terms:  # one route_chunks per term, on kvtier's table for it
        table, term_options = kernel_chunk_table(term, cfg, cs, gs, n)
        cand = torch.empty(bsz, hq, lq, nt, kt, dtype=torch.int64)
        route_chunks(
            q,
            table,
            cand,
            start_pos=start_pos,
            chunk_size=c,
            sink_chunks=cfg.sink_chunks,
            local_chunks=cfg.local_chunks,
            block_t=bt,
            **options,
            **term_options,
        )
        cands.append(cand)
    out = [torch.full((bsz, hq, lq, w), -7, dtype=torch.int64) for w in (kc_w, kg_w, kf_w)]
    routed = torch.full((bsz, hq, lq, kg_w), -7, dtype=torch.int32)
    route_groups(
        cands[0],
        q,
        gs,
        *out,
        routed,
        top_chunks=cfg.top_chunks,
        top_groups=cfg.top_groups,
        fetch_groups=cfg.fetch_groups,
        group_score=cfg.group_score,
        group_merge=cfg.group_merge,
        group_reserve=cfg.group_reserve,
        cand2=cands[1] if len(cands) > 1 else None,
    )
    assert torch.equal(routed.long(), out[1])
    return out


@pytest.mark.parametrize(
    "dtype,hq,hkv,lq,start_pos,lk,block_t",
    [
        (torch.float32, 4, 1, 1, 300, 301, 16),  # decode, GQA 4, several tiles
        (torch.float16, 2, 2, 1, 120, 130, None),  # decode, MHA, Lk past the query
        (torch.float32, 4, 2, 20, 170, 200, 16),  # prefill rows over two chunks, partial first
        (torch.float32, 8, 1, 3, 40, 43, None),  # few candidates: widths clipped, rows padded
    ],
)
@pytest.mark.parametrize("cfg", [CFG, PAPER, UNITS, UNITS_SUM, RANK, RESERVE],
                         ids=["default", "paper", "units", "units-sum", "rank", "reserve"])
def test_routing_matches_reference_plan(dtype, hq, hkv, lq, start_pos, lk, block_t, cfg):
    torch.manual_seed(3)
    d = 32
    q = torch.randn(2 if lq == 1 else 1, hq, lq, d, dtype=dtype)
    k = torch.randn(q.shape[0], hkv, lk, d, dtype=dtype)
    _, stats = hga_attention(q, k, k, config=cfg, rope_theta=THETA, start_pos=start_pos)
    if cfg in (RANK, RESERVE) and lk >= 200:  # the merge matters on these rows (the few-candidate rows take every group)
        for other in (CFG, RANK, RESERVE):
            if other is not cfg:
                _, plan = hga_attention(q, k, k, config=other, rope_theta=THETA, start_pos=start_pos)
                assert not torch.equal(stats.plan.group_ids, plan.plan.group_ids)
    chunk_ids, group_ids, fetch_ids = kernel_plan(q, k, cfg, start_pos, block_t)
    assert torch.equal(chunk_ids, stats.plan.chunk_ids)
    assert torch.equal(group_ids, stats.plan.group_ids)
    assert torch.equal(fetch_ids, stats.plan.fetch_group_ids)


def test_routing_full_coverage_selects_every_candidate():
    torch.manual_seed(4)
    cfg = HGAConfig.full_coverage(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=1)
    q = torch.randn(1, 2, 1, 32)
    k = torch.randn(1, 1, 200, 32)
    _, stats = hga_attention(q, k, k, config=cfg, rope_theta=THETA, start_pos=199)
    chunk_ids, group_ids, fetch_ids = kernel_plan(q, k, cfg, 199)
    assert torch.equal(chunk_ids, stats.plan.chunk_ids)
    assert torch.equal(group_ids, stats.plan.group_ids)
    assert torch.equal(fetch_ids, stats.plan.fetch_group_ids)


@pytest.mark.parametrize(
    "options", [dict(sort=True), dict(block_r=64, num_warps=8), dict(use_dot=False, block_r=4)]
)
def test_routing_variants_agree(options):
    """Selection by bitonic sort, and 64-row blocks, give the same plan."""
    torch.manual_seed(13)
    q = torch.randn(1, 4, 12, 32)  # rows 188..199 cross the chunk boundary at 192
    k = torch.randn(1, 2, 200, 32)
    _, stats = hga_attention(q, k, k, config=CFG, rope_theta=THETA, start_pos=188)
    chunk_ids, group_ids, fetch_ids = kernel_plan(q, k, CFG, 188, 16, **options)
    assert torch.equal(chunk_ids, stats.plan.chunk_ids)
    assert torch.equal(fetch_ids, stats.plan.fetch_group_ids)


@pytest.mark.parametrize(
    "chunk_score, group_score",
    [("max_group", "sum"), ("sum", "bound"), ("max_group", "bound"), ("sum", "sum+bound"), ("max_group", "sum+bound")],
)
@pytest.mark.parametrize(
    "hq,hkv,lq,start_pos,lk,options",
    [
        (4, 1, 1, 300, 301, dict(use_dot=False, block_r=4)),  # decode, GQA 4, FMA scores
        (4, 2, 40, 170, 210, {}),  # prefill rows over three chunks, tl.dot scores
    ],
)
def test_routing_options_match_reference_plan(chunk_score, group_score, hq, hkv, lq, start_pos, lk, options):
    """HGAConfig.chunk_score='max_group' and group_score='bound' in the kernels: the reference's plans."""
    torch.manual_seed(21)
    cfg = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=3, top_groups=5,
                    fetch_groups=8, chunk_score=chunk_score, group_score=group_score)
    q = torch.randn(1, hq, lq, 32)
    k = torch.randn(1, hkv, lk, 32)
    _, stats = hga_attention(q, k, k, config=cfg, rope_theta=THETA, start_pos=start_pos)
    _, base = hga_attention(q, k, k, config=CFG, rope_theta=THETA, start_pos=start_pos)
    assert not torch.equal(stats.plan.fetch_group_ids, base.plan.fetch_group_ids)  # the option matters here
    chunk_ids, group_ids, fetch_ids = kernel_plan(q, k, cfg, start_pos, 16, **options)
    assert torch.equal(chunk_ids, stats.plan.chunk_ids)
    assert torch.equal(group_ids, stats.plan.group_ids)
    assert torch.equal(fetch_ids, stats.plan.fetch_group_ids)


@pytest.mark.parametrize(
    "chunk_score, group_score, options",
    [
        ("running_max", "sum", dict(use_dot=False, block_r=4)),  # FMA scores, LayerDecode's default rows
        ("running_max_group", "bound", {}),  # tl.dot scores, rows padded to 16
        ("running_max+sum", "sum", {}),  # a split: half by the running max, half by the sum
        ("running_max+max_group", "sum+bound", {}),  # splits at both levels, the bounds of [sum, min, max]
    ],
)
def test_decode_steps_with_running_scores_match_reference(chunk_score, group_score, options):
    """Decode one position at a time across chunk boundaries, the carry updated in place
    (LayerDecode's use) over three tiles of chunks: every step's plan is the reference's
    (batch 2, GQA 3, last chunk partial)."""
    torch.manual_seed(5)
    cfg = HGAConfig(chunk_size=4, group_size=2, sink_chunks=1, local_chunks=2, top_chunks=3, top_groups=4,
                    fetch_groups=6, chunk_score=chunk_score, group_score=group_score)
    c, first, last = 4, 164, 177  # chunks 41..43 whole, then 44 partial: 41 to 44 candidates
    q = torch.randn(2, 3, last - first + 1, 16)
    k = torch.randn(2, 1, last + 1, 16)
    _, want = hga_decode_ref(q, k, k, config=cfg, rope_theta=THETA, start_pos=first)
    _, base = hga_decode_ref(q, k, k, config=dataclasses.replace(cfg, chunk_score="sum"), rope_theta=THETA,
                             start_pos=first)
    assert not torch.equal(want.plan.chunk_ids, base.plan.chunk_ids)  # the running max matters here
    cs, gs = routing_summaries_ref(k[:, :, : (last // c) * c], cfg, rope_inv_freq(16, THETA))
    # A stale carry (the previous chunk's maxima, or junk) must be reset when a chunk opens.
    carry = torch.full((2, 3, last // c), 1e30)
    for t in range(first, last + 1):
        w = windows_at(t, c, cfg.sink_chunks, cfg.local_chunks)
        bt, nt, kt = route_chunks_tiles(w.local_start, cfg.top_chunks, block_t=16)
        widths = plan_widths(cfg, t)
        cands = []
        for term in cfg.chunk_score_terms:
            cand = torch.empty(2, 3, 1, nt, kt, dtype=torch.int64)
            running = term.startswith("running_")
            table, term_options = kernel_chunk_table(term, cfg, cs, gs, w.local_start)
            route_chunks(q[:, :, t - first : t - first + 1], table, cand, start_pos=t,
                         chunk_size=c, sink_chunks=1, local_chunks=2, block_t=bt, **term_options,
                         carry_in=carry if running else None, carry_out=carry if running else None, **options)
            cands.append(cand)
        out = [torch.full((2, 3, 1, wd), -7, dtype=torch.int64) for wd in widths]
        routed = torch.full((2, 3, 1, widths[1]), -7, dtype=torch.int32)
        route_groups(cands[0], q[:, :, t - first : t - first + 1], gs, *out, routed, top_chunks=3, top_groups=4,
                     fetch_groups=6, group_score=group_score, cand2=cands[1] if len(cands) > 1 else None)
        i = t - first
        assert torch.equal(out[0], want.plan.chunk_ids[:, :, i : i + 1, : widths[0]]), t
        assert torch.equal(out[2], want.plan.fetch_group_ids[:, :, i : i + 1, : widths[2]]), t


def test_route_chunks_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 1, 32)
    cand = torch.empty(1, 2, 1, 1, 3, dtype=torch.int64)
    summ = torch.randn(1, 1, 10, 32)
    geo = dict(start_pos=200, chunk_size=16, sink_chunks=1, local_chunks=2, block_t=16)
    with pytest.raises(ValueError, match="score: expected one of"):
        route_chunks(q, summ, cand, score="sum+max_group", **geo)
    with pytest.raises(ValueError, match="bound: expected a max_group score"):
        route_chunks(q, summ, cand, bound=True, **geo)
    with pytest.raises(TypeError, match="carry_in: expected a float32 tensor"):
        route_chunks(q, summ, cand, score="running_max", **geo)
    carry = torch.zeros(1, 2, 10)
    with pytest.raises(ValueError, match=r"carry_out: expected \[1, 2, >= 10\] float32"):
        route_chunks(q, summ, cand, score="running_max", carry_in=carry, carry_out=carry[:, :, :5], **geo)
    with pytest.raises(ValueError, match="carry_in, carry_out: expected None"):
        route_chunks(q, summ, cand, carry_in=carry, carry_out=carry, **geo)
    q3 = torch.randn(1, 2, 20, 32)  # positions 200..219 lie in two chunks: one in-place carry would race
    cand3 = torch.empty(1, 2, 20, 1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="carry_out: expected a tensor other than carry_in for queries over 2"):
        route_chunks(q3, summ, cand3, score="running_max", carry_in=carry, carry_out=carry, **geo)
    with pytest.raises(ValueError, match=r"chunk_summ: expected \[B=1, Hkv \| 2, N, M, 64\]"):
        route_chunks(q, torch.randn(1, 1, 10, 4, 32), cand, score="max_group", bound=True, **geo)
    with pytest.raises(ValueError, match="units: expected 1, or a positive int with a max_group score"):
        route_chunks(q, summ, cand, units=2, **geo)
    with pytest.raises(ValueError, match="units: expected a divisor of the 4 groups per chunk, got 3"):
        route_chunks(q, torch.randn(1, 1, 10, 4, 32), cand, score="max_group", units=3, **geo)


@pytest.mark.parametrize("layout,units", [("bound", 2), ("bound", 4), ("sum", 2)])
@pytest.mark.parametrize("score", ["max_group", "running_max_group"])
def test_units_merged_in_the_kernel_equal_units_merged_before_it(layout, units, score):
    # The fused merge reads the M group rows and scores the M / units units; scoring the table
    # merge_group_keys_ref builds must give the same keys bit for bit (min/max are exact, and
    # the sum of two rows is one rounding either way). Non-contiguous groups: a view of
    # [sum, min, max] rows, as kvtier passes it.
    torch.manual_seed(units)
    d, start_pos, lq = 16, 200, 5  # positions 200..204: one chunk of 16, decode-like rows
    q = torch.randn(2, 4, lq, d)
    rows = torch.randn(2, 2, 12, 4, 3 * d)
    table = rows[..., d:] if layout == "bound" else rows[..., :d]
    merged = merged_group_keys_ref(table.contiguous(), layout, d, units)
    geo = dict(start_pos=start_pos, chunk_size=16, sink_chunks=1, local_chunks=2, block_t=16)
    running = score.startswith("running")
    outs = []
    for t, u in ((table, units), (merged, 1)):
        cand = torch.empty(2, 4, lq, 1, 3, dtype=torch.int64)
        carry = dict(carry_in=torch.zeros(2, 4, 12), carry_out=torch.zeros(2, 4, 12)) if running else {}
        route_chunks(q, t, cand, score=score, bound=layout == "bound", units=u, **geo, **carry)
        outs.append(cand)
    assert torch.equal(outs[0], outs[1])
    assert (outs[0] != -(2**63)).any()  # some candidates were scored


def test_route_groups_refuses_keys_of_the_wrong_width():
    """group_score names the group keys' width (D, 2D, 3D): a mismatch or an unknown score is an error."""
    q = torch.randn(1, 2, 1, 32)
    cand = torch.zeros(1, 2, 1, 1, 3, dtype=torch.int64)
    out = [torch.empty(1, 2, 1, w, dtype=torch.int64) for w in (3, 5, 8)]
    routed = torch.empty(1, 2, 1, 5, dtype=torch.int32)
    budgets = dict(top_chunks=3, top_groups=5, fetch_groups=8)
    with pytest.raises(ValueError, match=r"group_summ: expected a last dim of 96 \(group_score='sum\+bound'\)"):
        route_groups(cand, q, torch.randn(1, 1, 10, 4, 64), *out, routed, group_score="sum+bound", **budgets)
    with pytest.raises(ValueError, match="group_score: expected one of"):
        route_groups(cand, q, torch.randn(1, 1, 10, 4, 32), *out, routed, group_score="max", **budgets)
