"""Routing options of HGAConfig (chunk_score, group_score) in the reference: exact at full
coverage, causal bit for bit, prefill == decode (the running max through its carry), a
scalar brute force of every score, and "sum" as the paper's rule."""

from __future__ import annotations

import pytest
import torch

from kvtier import ConfigError, HGAConfig
from kvtier.layout import windows_at
from kvtier.reference import (
    RouteCarry,
    group_bounds_ref,
    hga_attention,
    merged_group_keys_ref,
    hga_decode_ref,
    hga_prefill_ref,
    plan_widths,
    route_block,
    routing_summaries_ref,
    rope_inv_freq,
)

from .bruteforce import hga_bruteforce
from .test_hga_reference import THETA, make_qkv, rel_err, sdpa_causal

GEOMETRY = dict(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2)
OPTIONS = [
    ("sum", "sum"),
    ("max_group", "sum"),
    ("running_max", "sum"),
    ("running_max_group", "sum"),
    ("sum", "bound"),
    ("max_group", "bound"),
    ("sum+max_group", "sum"),
    ("running_max+sum", "bound"),
    ("max_group+running_max_group", "bound"),
    ("sum", "sum+bound"),
    ("sum+max_group", "sum+bound"),
    ("sum+max_group", "sum+bound/rank"),  # group_merge="rank"
    ("sum", "sum+bound/rank:1"),  # and group_reserve=1: one group by each score, then the rank sum
]
IDS = [f"{c}/{g}" for c, g in OPTIONS]


def scores(chunk_score: str, group_score: str) -> dict[str, str]:
    """HGAConfig fields of an OPTIONS pair: ``"sum+bound/rank"`` is group_score "sum+bound" with
    group_merge "rank", and ``"sum+bound/rank:1"`` that with group_reserve 1."""
    group_score, _, merge = group_score.partition("/")
    merge, _, reserve = merge.partition(":")
    return dict(chunk_score=chunk_score, group_score=group_score, group_merge=merge or "split",
                group_reserve=int(reserve or 0))


def sparse(chunk_score: str, group_score: str, **kw: int) -> HGAConfig:
    base = dict(GEOMETRY, top_chunks=3, top_groups=3, fetch_groups=5)
    base.update(kw)
    return HGAConfig(**base, **scores(chunk_score, group_score))


@pytest.mark.parametrize("chunk_score, group_score", OPTIONS, ids=IDS)
def test_full_coverage_is_dense(chunk_score, group_score):
    cfg = HGAConfig.full_coverage(**GEOMETRY, **scores(chunk_score, group_score))
    q, k, v = make_qkv(2, 6, 2, 133, 133, 16, seed=1)
    for path in (hga_prefill_ref, hga_decode_ref):
        out, stats = path(q, k, v, config=cfg, rope_theta=THETA)
        assert rel_err(out, sdpa_causal(q, k, v, 0)) < 1e-5
        assert stats.density == 1.0


@pytest.mark.parametrize("chunk_score, group_score", OPTIONS, ids=IDS)
def test_matches_scalar_bruteforce(chunk_score, group_score):
    """Every score computed by scalar loops from its definition picks the same groups."""
    cfg = sparse(chunk_score, group_score, top_chunks=3, top_groups=5, fetch_groups=5)
    q, k, v = make_qkv(1, 4, 2, 110, 110, 8, seed=len(chunk_score) + len(group_score))
    out, stats = hga_attention(q, k, v, config=cfg, rope_theta=THETA)
    want, groups, counts = hga_bruteforce(q, k, v, cfg=cfg, theta=THETA)
    assert rel_err(out, want) < 1e-5
    assert torch.equal(stats.keys_per_query, counts)
    bad = [(key, sorted(g)) for key, g in groups.items() if {int(x) for x in stats.plan.group_ids[key] if x >= 0} != g]
    assert not bad, bad[:3]


@pytest.mark.parametrize("chunk_score, group_score", OPTIONS, ids=IDS)
@pytest.mark.parametrize("hq, hkv", [(4, 2), (3, 1)])
def test_prefill_equals_decode(chunk_score, group_score, hq, hkv):
    cfg = sparse(chunk_score, group_score)
    q, k, v = make_qkv(2, hq, hkv, 150, 150, 16, seed=hq)
    out_p, st_p = hga_prefill_ref(q, k, v, config=cfg, rope_theta=THETA)
    out_d, st_d = hga_decode_ref(q, k, v, config=cfg, rope_theta=THETA)
    for f in ("chunk_ids", "group_ids", "fetch_group_ids"):
        assert torch.equal(getattr(st_p.plan, f), getattr(st_d.plan, f)), f
    assert rel_err(out_p, out_d) < 1e-5
    assert (st_p.plan.carry is None) == (not cfg.running_routing)


@pytest.mark.parametrize("chunk_score, group_score", OPTIONS, ids=IDS)
def test_pieces_with_carry_equal_one_call(chunk_score, group_score):
    """Split mid-chunk (77 = 4 * 16 + 13) and into single tokens: the carry makes the pieces one pass."""
    cfg = sparse(chunk_score, group_score)
    q, k, v = make_qkv(1, 4, 2, 120, 120, 16, seed=3)
    whole, st = hga_attention(q, k, v, config=cfg, rope_theta=THETA)
    outs, plans, carry, prev = [], [], None, 0
    for cut in (77, 78, 79, 100, 120):
        o, s = hga_attention(q[:, :, prev:cut], k, v, config=cfg, rope_theta=THETA, start_pos=prev, route_carry=carry)
        outs.append(o)
        plans.append(s.plan.group_ids)
        carry, prev = s.plan.carry, cut
    assert torch.equal(torch.cat(plans, 2), st.plan.group_ids)
    assert rel_err(torch.cat(outs, 2), whole) < 1e-6


@pytest.mark.parametrize("chunk_score, group_score", OPTIONS, ids=IDS)
@pytest.mark.parametrize("path", [hga_prefill_ref, hga_decode_ref])
def test_causal_bit_for_bit(chunk_score, group_score, path):
    """Changing queries, keys and values after position 70 (mid-chunk) never changes an earlier bit."""
    cfg = sparse(chunk_score, group_score)
    cut = 70
    q, k, v = make_qkv(1, 4, 2, 130, 130, 16, seed=5)
    before, st_b = path(q, k, v, config=cfg, rope_theta=THETA)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(9)
    for t in (q2, k2, v2):
        t[:, :, cut + 1 :] = torch.randn(t[:, :, cut + 1 :].shape, generator=g) * 5
    after, st_a = path(q2, k2, v2, config=cfg, rope_theta=THETA)
    assert torch.equal(before[:, :, : cut + 1], after[:, :, : cut + 1])
    assert torch.equal(st_b.plan.group_ids[:, :, : cut + 1], st_a.plan.group_ids[:, :, : cut + 1])
    assert not torch.equal(before[:, :, cut + 1 :], after[:, :, cut + 1 :])


def _members(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``[..., n]``: which ids a plan row holds (``-1`` pads)."""
    hit = torch.zeros(*ids.shape[:-1], n + 1, dtype=torch.bool)
    return hit.scatter(-1, torch.where(ids >= 0, ids, n), True)[..., :n]


@pytest.mark.parametrize("chunk_score, group_score", OPTIONS, ids=IDS)
def test_plans_nest_as_the_budget_grows(chunk_score, group_score):
    """A larger budget keeps every chunk and group a smaller one routed (the split rules too: their
    first half grows and the second only gains rank), so a budget sweep adds keys, never swaps them."""
    q, k, v = make_qkv(1, 4, 2, 150, 150, 16, seed=6)

    def plan(**kw):
        return hga_decode_ref(q, k, v, config=sparse(chunk_score, group_score, **kw), rope_theta=THETA)[1].plan

    n_chunks = -(-150 // GEOMETRY["chunk_size"])
    n_groups = n_chunks * GEOMETRY["chunk_size"] // GEOMETRY["group_size"]
    groups = [_members(plan(top_chunks=4, top_groups=g, fetch_groups=g).group_ids, n_groups) for g in (3, 6, 7, 12)]
    chunks = [_members(plan(top_chunks=c, top_groups=2, fetch_groups=2).chunk_ids, n_chunks) for c in (1, 2, 3, 5)]
    for small, large in [*zip(groups, groups[1:]), *zip(chunks, chunks[1:])]:
        assert not (small & ~large).any()
        assert (large & ~small).any()  # and the larger budget routes something more


def test_max_group_size_of_one_group_is_todays_plan():
    """max_group_size=group_size routes bit for bit as the default None."""
    q, k, v = make_qkv(1, 4, 2, 150, 150, 16, seed=7)
    for path in (hga_prefill_ref, hga_decode_ref):
        out0, st0 = path(q, k, v, config=sparse("sum+max_group", "sum+bound"), rope_theta=THETA)
        out1, st1 = path(q, k, v, config=sparse("sum+max_group", "sum+bound", max_group_size=4), rope_theta=THETA)
        assert torch.equal(out0, out1) and torch.equal(st0.plan.fetch_group_ids, st1.plan.fetch_group_ids)


@pytest.mark.parametrize("chunk_score, group_score", [("sum+max_group", "sum+bound"), ("max_group", "bound")])
def test_units_rank_chunks_as_groups_that_large(chunk_score, group_score):
    """Units of 4 tokens over groups of 2 pick the chunks groups of 4 pick (the bound of a unit is
    its keys' bound), and then route among groups of 2: another group plan, the same chunk plan."""
    q, k, v = make_qkv(1, 4, 2, 150, 150, 16, seed=8)
    fine = sparse(chunk_score, group_score, group_size=2, max_group_size=4, top_groups=6, fetch_groups=10)
    coarse = sparse(chunk_score, group_score, group_size=4, top_groups=3, fetch_groups=5)
    plain = sparse(chunk_score, group_score, group_size=2, top_groups=6, fetch_groups=10)
    for path in (hga_prefill_ref, hga_decode_ref):
        p_fine, p_coarse, p_plain = (path(q, k, v, config=c, rope_theta=THETA)[1].plan for c in (fine, coarse, plain))
        assert torch.equal(p_fine.chunk_ids, p_coarse.chunk_ids)
        assert not torch.equal(p_fine.chunk_ids, p_plain.chunk_ids)  # the units change the first level


def test_max_group_size_full_coverage_and_causal():
    cfg = HGAConfig.full_coverage(**dict(GEOMETRY, group_size=2), max_group_size=8)
    q, k, v = make_qkv(2, 6, 2, 133, 133, 16, seed=1)
    out, stats = hga_prefill_ref(q, k, v, config=cfg, rope_theta=THETA)
    assert rel_err(out, sdpa_causal(q, k, v, 0)) < 1e-5 and stats.density == 1.0
    cfg = sparse("sum+max_group", "sum+bound", group_size=2, max_group_size=8, top_groups=6, fetch_groups=10)
    q, k, v = make_qkv(1, 4, 2, 130, 130, 16, seed=5)
    before, _ = hga_prefill_ref(q, k, v, config=cfg, rope_theta=THETA)
    k2 = k.clone()
    k2[:, :, 71:] = torch.randn(k2[:, :, 71:].shape, generator=torch.Generator().manual_seed(9)) * 5
    after, _ = hga_prefill_ref(q, k2, v, config=cfg, rope_theta=THETA)
    assert torch.equal(before[:, :, :71], after[:, :, :71]) and not torch.equal(before[:, :, 71:], after[:, :, 71:])


def test_merged_group_keys_are_the_units_keys():
    k = torch.randn(1, 2, 3 * 16, 8)
    for score in ("bound", "sum+bound"):
        cfg2, cfg8 = (HGAConfig(chunk_size=16, group_size=g, group_score=score) for g in (2, 8))
        _, g2 = routing_summaries_ref(k, cfg2, rope_inv_freq(8, THETA))
        _, g8 = routing_summaries_ref(k, cfg8, rope_inv_freq(8, THETA))
        merged = merged_group_keys_ref(g2, score, 8, 4)
        assert torch.equal(merged[..., -16:], g8[..., -16:])  # the bounds: exactly those of 8 keys
        if score == "sum+bound":  # the sums add the groups' own summaries
            assert torch.equal(merged[..., :8], g2[..., :8].reshape(1, 2, 3, 2, 4, 8).sum(-2))
    with pytest.raises(ValueError, match="per_unit: expected a divisor of the 8 groups per chunk, got 3"):
        merged_group_keys_ref(g2, "sum+bound", 8, 3)


def test_sum_is_the_papers_rule():
    """chunk_score='sum', group_score='sum' are the paper's (HGAConfig.paper()) and route like a config that never heard of them."""
    assert (HGAConfig.paper().chunk_score, HGAConfig.paper().group_score) == ("sum", "sum")
    cfg = sparse("sum", "sum")
    q, k, v = make_qkv(1, 4, 2, 150, 150, 16, seed=2)
    _, explicit = hga_attention(q, k, v, config=cfg, rope_theta=THETA)
    paper = HGAConfig.paper(**GEOMETRY, top_chunks=3, top_groups=3, fetch_groups=5)
    _, papers = hga_attention(q, k, v, config=paper, rope_theta=THETA)
    assert torch.equal(explicit.plan.fetch_group_ids, papers.plan.fetch_group_ids)
    assert explicit.plan.carry is None
    _, default = hga_attention(q, k, v, config=HGAConfig(**GEOMETRY, top_chunks=3, top_groups=3, fetch_groups=5),
                               rope_theta=THETA)
    assert not torch.equal(explicit.plan.fetch_group_ids, default.plan.fetch_group_ids)  # the default is not


def test_options_change_the_plan():
    """Each option really routes differently from the summed rule somewhere (the test would catch a no-op)."""
    q, k, v = make_qkv(1, 4, 2, 150, 150, 16, seed=8)
    _, base = hga_attention(q, k, v, config=sparse("sum", "sum"), rope_theta=THETA)
    for chunk_score, group_score in OPTIONS[1:]:
        _, st = hga_attention(q, k, v, config=sparse(chunk_score, group_score), rope_theta=THETA)
        assert not torch.equal(st.plan.group_ids, base.plan.group_ids), (chunk_score, group_score)


def test_rank_merge_prefers_a_group_both_scores_like():
    """group_merge="rank": the least rank sum first (ties to the lesser rank, then the earlier
    candidate), then the prefetch by the first score; the split would take the first score's best."""
    from kvtier.reference.hga import _rank_best_first, _split_best_first

    first = torch.tensor([[10.0, 9.0, 0.0, 8.0]], dtype=torch.float64)
    second = torch.tensor([[0.0, 9.0, 10.0, 8.0]], dtype=torch.float64)  # ranks 3, 1, 0, 2 (first: 0, 1, 3, 2)
    assert _rank_best_first(first, second, 1, 4).tolist() == [[1, 0, 3, 2]]
    assert _rank_best_first(first, second, 2, 4).tolist() == [[1, 0, 3, 2]]  # 0 and 2 tie on (3, 0): 0 earlier
    assert _rank_best_first(first, second, 3, 4).tolist() == [[1, 0, 2, 3]]
    assert _split_best_first(first, second, 1, 1, 4).tolist() == [[0, 1, 3, 2]]
    assert _rank_best_first(first, second, 3, 4, reserve=1).tolist() == [[0, 2, 1, 3]]  # 0 and 2 reserved
    assert _rank_best_first(first, second, 3, 4, reserve=5).tolist() == [[0, 2, 1, 3]]  # clipped to k // 2 = 1
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, generator=g, dtype=torch.float64), torch.randn(3, 40, generator=g, dtype=torch.float64)
    assert torch.equal(_rank_best_first(a, b, 12, 20, reserve=6), _split_best_first(a, b, 12, 6, 20))  # Kg // 2: the split
    assert not torch.equal(_rank_best_first(a, b, 12, 20, reserve=5), _split_best_first(a, b, 12, 6, 20))


def test_rank_merge_changes_the_plan_of_the_split():
    q, k, v = make_qkv(1, 4, 2, 150, 150, 16, seed=8)
    plans = [hga_attention(q, k, v, config=sparse("sum+max_group", g, top_groups=4), rope_theta=THETA)[1].plan
             for g in ("sum+bound", "sum+bound/rank")]
    assert torch.equal(plans[0].chunk_ids, plans[1].chunk_ids)  # the merge is of the group level only
    assert not torch.equal(plans[0].group_ids, plans[1].group_ids)


def test_running_max_is_the_max_over_earlier_queries():
    """A chunk favoured only by its chunk's first query stays routed for all the later queries."""
    q, k, v = make_qkv(1, 1, 1, 112, 112, 16, seed=4)
    k[:, :, 20] = 40.0  # one key of chunk 1 aligned with one strong query
    q[:, :, 96] = 40.0  # first query of chunk 6 (candidates with F=1, L=2: chunks 1, 2, 3)
    got = {}
    for score in ("sum", "running_max"):
        _, st = hga_attention(q, k, v, config=sparse(score, "sum", top_chunks=1, top_groups=4), rope_theta=THETA)
        got[score] = st.plan.chunk_ids[0, 0, 96:112, 0].tolist()
    assert got["running_max"] == [1] * 16
    assert got["sum"][0] == 1 and got["sum"] != [1] * 16


def test_group_bounds_are_min_max():
    k = torch.randn(2, 3, 35, 8)
    b = group_bounds_ref(k, 16, 4)
    assert b.shape == (2, 3, 2, 4, 16)
    assert torch.equal(b[1, 2, 1, 3, :8], k[1, 2, 28:32].amin(0))
    assert torch.equal(b[1, 2, 1, 3, 8:], k[1, 2, 28:32].amax(0))


def test_carry_errors():
    cfg = sparse("running_max", "sum")
    q, k, v = make_qkv(1, 4, 2, 100, 100, 16, seed=6)
    with pytest.raises(ValueError, match=r"carry: expected the RouteCarry of positions 64..76 \(next_pos=77\), got NoneType"):
        hga_attention(q[:, :, 77:], k, v, config=cfg, rope_theta=THETA, start_pos=77)
    _, st = hga_attention(q[:, :, :70], k, v, config=cfg, rope_theta=THETA, start_pos=0)
    with pytest.raises(ValueError, match="got next_pos=70"):
        hga_attention(q[:, :, 77:], k, v, config=cfg, rope_theta=THETA, start_pos=77, route_carry=st.plan.carry)
    with pytest.raises(TypeError, match="route_carry: expected a RouteCarry or None, got dict"):
        hga_attention(q, k, v, config=cfg, rope_theta=THETA, route_carry={})  # type: ignore[arg-type]
    # A carry passed at a chunk start belongs to the previous chunk and is ignored.
    a, _ = hga_attention(q[:, :, 64:], k, v, config=cfg, rope_theta=THETA, start_pos=64, route_carry=st.plan.carry)
    b, _ = hga_attention(q[:, :, 64:], k, v, config=cfg, rope_theta=THETA, start_pos=64)
    assert torch.equal(a, b)


def test_route_block_checks():
    cfg = sparse("running_max", "bound")
    q, k, _ = make_qkv(1, 4, 2, 1, 100, 16, seed=7)
    cs, gs = routing_summaries_ref(k[:, :, :96], cfg, rope_inv_freq(16, THETA))
    win = windows_at(99, 16, 1, 2)
    widths = plan_widths(cfg, 99)
    with pytest.raises(ValueError, match="first_pos: expected the block's first position"):
        route_block(q, cs, gs, win, cfg, widths)
    with pytest.raises(ValueError, match=r"first_pos: expected 1 positions inside chunk 6 \(96..111\), got first_pos=90"):
        route_block(q, cs, gs, win, cfg, widths, first_pos=90)
    with pytest.raises(ValueError, match="group_summ: expected a last dim of 32 for group_score='bound'"):
        route_block(q, cs, gs[..., :16], win, cfg, widths, first_pos=96)
    bad = RouteCarry(99, (torch.zeros(1, 4, 7, dtype=torch.float64),))
    with pytest.raises(ValueError, match=r"carry: expected 1 tensors \[1, 4, 3\]"):
        route_block(q, cs, gs, win, cfg, widths, first_pos=99, carry=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_score="max"), "chunk_score: expected one of"),
        (dict(chunk_score="sum+sum"), "two different ones"),
        (dict(chunk_score="sum+max_group+running_max"), "chunk_score: expected one of"),
        (dict(group_score="max"), r"group_score: expected one of \('sum', 'bound', 'sum\+bound'\), got 'max'"),
        (dict(group_score="bound+sum"), "group_score: expected one of"),
        (dict(max_group_size=24), r"max_group_size: expected a multiple of group_size=16 dividing chunk_size=64, got 24"),
        (dict(max_group_size=8), "max_group_size: expected a multiple of group_size=16"),
        (dict(max_group_size=32, chunk_score="sum"), "max_group_size: expected a max_group term in chunk_score"),
        (dict(max_group_size=True), "max_group_size: expected an int, got bool"),
        (dict(group_merge="borda"), r"group_merge: expected one of \('split', 'rank'\), got 'borda'"),
        (dict(group_merge="rank", group_score="bound"), "group_merge: expected group_score='sum\\+bound' to merge"),
        (dict(group_reserve=4), "group_reserve: expected group_merge='rank' to reserve groups for, got group_merge='split'"),
        (dict(group_merge="rank", group_reserve=-1), "group_reserve: expected an int >= 0, got -1"),
    ],
)
def test_config_rejects_bad_scores(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HGAConfig(**kwargs)
