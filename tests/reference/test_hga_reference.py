"""The reference HGA against dense attention, a scalar brute force, itself (prefill vs decode) and causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import HGAConfig
from kvtier.reference import dense_attention_ref, hga_attention, hga_decode_ref, hga_prefill_ref

from .bruteforce import hga_bruteforce

THETA = 1e4


def make_qkv(b, hq, hkv, lq, lk, d, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa_causal(q, k, v, start_pos):
    """Independent dense baseline: torch SDPA with an explicit causal mask, fp32."""
    lq, lk = q.shape[2], k.shape[2]
    mask = torch.arange(lk)[None, :] <= torch.arange(start_pos, start_pos + lq)[:, None]
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=mask)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


SMALL = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=2, top_groups=3, fetch_groups=5)


# ---------------------------------------------------------------- exact at full coverage

@pytest.mark.parametrize(
    "path, length",
    [(path, n) for path in (hga_prefill_ref, hga_decode_ref) for n in (1, 63, 64, 65, 217)]
    + [(hga_prefill_ref, 1000),
       # the decode path is O(L^2) in Python (about 16 CPU-seconds here); prefill = decode is tested apart
       pytest.param(hga_decode_ref, 700, marks=pytest.mark.slow)],
)
def test_full_coverage_equals_dense(path, length):
    q, k, v = make_qkv(2, 4, 2, length, length, 64, seed=length)
    out, stats = path(q, k, v, config=HGAConfig.full_coverage(), rope_theta=THETA)
    assert rel_err(out, sdpa_causal(q, k, v, 0)) < 1e-5
    assert torch.equal(stats.keys_per_query, torch.arange(1, length + 1).expand(2, 4, length))
    assert stats.density == 1.0


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_full_coverage_gqa_and_head_dims(hq, hkv, head_dim):
    cfg = HGAConfig.full_coverage(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=1)
    q, k, v = make_qkv(2, hq, hkv, 90, 130, head_dim, seed=hq * 10 + hkv)
    out, _ = hga_attention(q, k, v, config=cfg, rope_theta=THETA, start_pos=40)  # Lk > start_pos + Lq
    assert rel_err(out, sdpa_causal(q, k[:, :, :130], v[:, :, :130], 40)) < 1e-5


def test_full_coverage_decode_with_offset():
    q, k, v = make_qkv(1, 4, 2, 1, 300, 64, seed=3)
    out, stats = hga_attention(q, k, v, config=HGAConfig.full_coverage(), rope_theta=THETA, start_pos=299)
    assert rel_err(out, sdpa_causal(q, k, v, 299)) < 1e-5
    assert int(stats.keys_per_query.unique()) == 300


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_torch_error(dtype):
    """bf16/fp16 inputs: error against the fp32 reference no worse than torch SDPA's in that dtype."""
    q, k, v = make_qkv(1, 4, 2, 150, 150, 64, seed=7)
    ref = sdpa_causal(q, k, v, 0)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out, _ = hga_attention(ql, kl, vl, config=HGAConfig.full_coverage(chunk_size=32, group_size=8), rope_theta=THETA)
    assert out.dtype == dtype
    rep = 2
    torch_err = rel_err(
        F.scaled_dot_product_attention(ql, kl.repeat_interleave(rep, 1), vl.repeat_interleave(rep, 1), is_causal=True), ref
    )
    assert rel_err(out, ref) <= 2 * torch_err + 1e-6


# ---------------------------------------------------------------- sparse: brute force, counts

@pytest.mark.parametrize(
    "b, hq, hkv, length, start_pos",
    [(1, 2, 1, 1, 0), (1, 3, 1, 97, 0), (2, 4, 2, 70, 50), (1, 8, 2, 40, 160)],
)
def test_sparse_matches_scalar_bruteforce(b, hq, hkv, length, start_pos):
    q, k, v = make_qkv(b, hq, hkv, length, start_pos + length, 16, seed=length + start_pos)
    out, stats = hga_attention(q, k, v, config=SMALL, rope_theta=THETA, start_pos=start_pos)
    want, groups, counts = hga_bruteforce(q, k, v, cfg=SMALL, theta=THETA, start_pos=start_pos)
    assert rel_err(out, want) < 1e-5
    assert torch.equal(stats.keys_per_query, counts)
    for (bi, h, i), chosen in groups.items():
        got = {int(x) for x in stats.plan.group_ids[bi, h, i] if x >= 0}
        assert got == chosen, (bi, h, i)


def test_keys_per_query_hand_count():
    """Sinks + local + routed groups + own chunk, clipped to what exists."""
    cfg = SMALL  # C=16, G=4, F=1, L=2, Kc=2, Kg=3
    q, k, v = make_qkv(1, 2, 1, 200, 200, 16, seed=11)
    _, stats = hga_prefill_ref(q, k, v, config=cfg, rope_theta=THETA)
    for t in range(200):
        cur = t // 16
        sinks = min(1, cur)
        local = min(2, cur - sinks)
        cands = cur - sinks - local
        routed_groups = min(3, min(2, cands) * 4)
        expected = 16 * (sinks + local) + 4 * routed_groups + (t - cur * 16 + 1)
        assert int(stats.keys_per_query[0, 0, t]) == expected, t


def test_zero_budgets_attend_only_windows():
    cfg = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=1, top_chunks=0, top_groups=0, fetch_groups=0)
    q, k, v = make_qkv(1, 2, 1, 100, 100, 16, seed=5)
    out, stats = hga_attention(q, k, v, config=cfg, rope_theta=THETA)
    assert stats.plan.group_ids.shape[-1] == 0
    t = torch.arange(100)
    cur = t // 16
    expected = 16 * (cur.clamp(max=1) + (cur - 1).clamp(min=0, max=1)) + t % 16 + 1
    assert torch.equal(stats.keys_per_query[0, 0], expected)


# ---------------------------------------------------------------- prefill == decode, causality

@pytest.mark.parametrize("hq, hkv", [(4, 4), (3, 1), (8, 2)])
def test_prefill_equals_decode(hq, hkv):
    q, k, v = make_qkv(2, hq, hkv, 230, 230, 32, seed=hq)
    out_p, st_p = hga_prefill_ref(q, k, v, config=SMALL, rope_theta=THETA)
    out_d, st_d = hga_decode_ref(q, k, v, config=SMALL, rope_theta=THETA)
    for f in ("chunk_ids", "group_ids", "fetch_group_ids"):
        assert torch.equal(getattr(st_p.plan, f), getattr(st_d.plan, f)), f
    assert torch.equal(st_p.keys_per_query, st_d.keys_per_query)
    assert rel_err(out_p, out_d) < 1e-5


def test_prefill_in_pieces_equals_one_call():
    """Prefill split at an arbitrary position (mid-chunk) gives the same rows as one call."""
    q, k, v = make_qkv(1, 4, 2, 200, 200, 32, seed=9)
    whole, _ = hga_prefill_ref(q, k, v, config=SMALL, rope_theta=THETA)
    a, _ = hga_prefill_ref(q[:, :, :77], k[:, :, :77], v[:, :, :77], config=SMALL, rope_theta=THETA)
    b, _ = hga_prefill_ref(q[:, :, 77:], k, v, config=SMALL, rope_theta=THETA, start_pos=77)
    assert rel_err(torch.cat([a, b], 2), whole) < 1e-6


@pytest.mark.parametrize("path", [hga_prefill_ref, hga_decode_ref])
@pytest.mark.parametrize("cut", [0, 37, 64, 150])
def test_causal_later_tokens_never_change_earlier_outputs(path, cut):
    q, k, v = make_qkv(1, 4, 2, 180, 180, 32, seed=cut)
    before, st_before = path(q, k, v, config=SMALL, rope_theta=THETA)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(99)
    for t in (q2, k2, v2):
        t[:, :, cut + 1 :] = torch.randn(t[:, :, cut + 1 :].shape, generator=g) * 5
    after, st_after = path(q2, k2, v2, config=SMALL, rope_theta=THETA)
    assert torch.equal(before[:, :, : cut + 1], after[:, :, : cut + 1])
    assert torch.equal(st_before.plan.group_ids[:, :, : cut + 1], st_after.plan.group_ids[:, :, : cut + 1])
    assert not torch.equal(before[:, :, cut + 1 :], after[:, :, cut + 1 :])  # the change did reach later rows


def test_non_contiguous_inputs():
    q, k, v = make_qkv(1, 4, 2, 120, 120, 32, seed=4)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, L, H, D] memory
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    a, _ = hga_attention(q, k, v, config=SMALL, rope_theta=THETA)
    b, _ = hga_attention(qt, kt, vt, config=SMALL, rope_theta=THETA)
    assert rel_err(b, a) < 1e-6


def test_dense_reference_matches_sdpa():
    q, k, v = make_qkv(2, 8, 2, 50, 90, 64, seed=1)
    assert rel_err(dense_attention_ref(q, k, v, start_pos=40), sdpa_causal(q, k, v, 40)) < 1e-5


# ---------------------------------------------------------------- property test

@settings(max_examples=25, deadline=None)
@given(
    chunk_size=st.sampled_from([4, 8, 16]),
    groups_per_chunk=st.sampled_from([1, 2, 4]),
    sinks=st.integers(0, 2),
    local=st.integers(0, 2),
    top_chunks=st.integers(0, 4),
    top_groups=st.integers(0, 8),
    rep=st.sampled_from([1, 2, 3]),
    hkv=st.sampled_from([1, 2]),
    length=st.integers(1, 120),
    start_pos=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_property_prefill_decode_and_counts(chunk_size, groups_per_chunk, sinks, local, top_chunks, top_groups, rep, hkv, length, start_pos, seed):
    gs = max(1, chunk_size // groups_per_chunk)
    cfg = HGAConfig(chunk_size=chunk_size, group_size=gs, sink_chunks=sinks, local_chunks=local,
                    top_chunks=top_chunks, top_groups=top_groups, fetch_groups=top_groups + 2)
    q, k, v = make_qkv(1, hkv * rep, hkv, length, start_pos + length, 8, seed=seed)
    out_p, st_p = hga_prefill_ref(q, k, v, config=cfg, rope_theta=THETA, start_pos=start_pos)
    out_d, st_d = hga_decode_ref(q, k, v, config=cfg, rope_theta=THETA, start_pos=start_pos)
    assert torch.equal(st_p.plan.group_ids, st_d.plan.group_ids)
    assert rel_err(out_p, out_d) < 1e-5
    # Every attended key count is bounded by the causal context and by the budget formula.
    pos = torch.arange(start_pos, start_pos + length)
    assert bool((st_p.keys_per_query <= pos + 1).all())
    bound = chunk_size * (sinks + local + 1) + gs * top_groups
    assert bool((st_p.keys_per_query <= bound).all())
    # Routed groups are distinct, inside routed chunks, and never inside a window.
    m = chunk_size // gs
    for idx in torch.nonzero(torch.ones(st_p.plan.group_ids.shape[:3], dtype=torch.bool)):
        gids = [int(x) for x in st_p.plan.group_ids[tuple(idx)] if x >= 0]
        cids = {int(x) for x in st_p.plan.chunk_ids[tuple(idx)] if x >= 0}
        assert len(set(gids)) == len(gids)
        assert all(gi // m in cids for gi in gids)


@settings(max_examples=10, deadline=None)
@given(length=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_property_full_coverage_is_dense(length, seed):
    cfg = HGAConfig.full_coverage(chunk_size=8, group_size=2, sink_chunks=1, local_chunks=1)
    q, k, v = make_qkv(1, 4, 2, length, length, 16, seed=seed)
    out, _ = hga_attention(q, k, v, config=cfg, rope_theta=THETA)
    assert rel_err(out, sdpa_causal(q, k, v, 0)) < 1e-5


# ---------------------------------------------------------------- bad input

def _good():
    return make_qkv(1, 4, 2, 8, 8, 16)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected 4 dimensions, got shape \(4, 8, 16\)"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "q: expected dtype in"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "k, v: expected dtype torch.float32 like q"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "v: expected the shape of k"),
        (lambda q, k, v: (q, k[:, :, :6], v[:, :, :6]), ValueError, "k: expected at least start_pos \\+ Lq = 8 key positions, got 6"),
        (lambda q, k, v: (q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16)), ValueError, "expected a number of KV heads dividing 4 query heads, got 3"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "k: expected batch 1 like q, got 2"),
        (lambda q, k, v: (q[..., :15], k[..., :15], v[..., :15]), ValueError, "k: expected head dim 15 like q, got 16|expected an even head dim"),
        (lambda q, k, v: ("q", k, v), TypeError, "q: expected a torch.Tensor, got str"),
    ],
)
def test_bad_inputs_raise(mutate, exc, match):
    q, k, v = mutate(*_good())
    with pytest.raises(exc, match=match):
        hga_attention(q, k, v, config=SMALL, rope_theta=THETA)


def test_bad_config_theta_start_pos():
    q, k, v = _good()
    with pytest.raises(TypeError, match="config: expected an HGAConfig, got dict"):
        hga_attention(q, k, v, config={}, rope_theta=THETA)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rope_theta: expected a positive number, got 0"):
        hga_attention(q, k, v, config=SMALL, rope_theta=0)
    with pytest.raises(ValueError, match="start_pos: expected an int >= 0, got -1"):
        hga_attention(q, k, v, config=SMALL, rope_theta=THETA, start_pos=-1)


# ---------------------------------------------------------------- the model's RoPE (RopeSpec)


def _interleaved_half_partial_spec():
    from kvtier.rope import RopeSpec

    inv = torch.tensor([1.0, 0.3, 0.05, 0.004, 2e-4], dtype=torch.float64)  # scaled, uneven frequencies
    return [RopeSpec(16, inv, attention_scaling=1.2), RopeSpec(16, inv, attention_scaling=1.2, interleaved=True)]


@pytest.mark.parametrize("which", [0, 1], ids=["half-split", "interleaved"])
def test_sparse_with_a_rope_spec_matches_bruteforce(which):
    """Routing with partial-rotary, scaled frequencies equals the scalar brute force with the same frequencies."""
    from .bruteforce import half_pairs, interleaved_pairs

    spec = _interleaved_half_partial_spec()[which]
    q, k, v = make_qkv(2, 4, 2, 60, 150, 16, seed=which)
    out, stats = hga_attention(q, k, v, config=SMALL, rope=spec, start_pos=90)
    pairs = interleaved_pairs(10) if spec.interleaved else half_pairs(16, 10)
    want, groups, counts = hga_bruteforce(q, k, v, cfg=SMALL, start_pos=90, freqs=spec.inv_freq.tolist(), pairs=pairs)
    assert rel_err(out, want) < 1e-5
    assert torch.equal(stats.keys_per_query, counts)
    for (bi, h, i), chosen in groups.items():
        assert {int(x) for x in stats.plan.group_ids[bi, h, i] if x >= 0} == chosen, (bi, h, i)


def test_rope_spec_and_theta_agree_and_exactly_one_is_given():
    from kvtier.rope import RopeSpec

    q, k, v = make_qkv(1, 2, 1, 40, 100, 16, seed=3)
    a, sa = hga_attention(q, k, v, config=SMALL, rope_theta=THETA, start_pos=60)
    b, sb = hga_attention(q, k, v, config=SMALL, rope=RopeSpec.plain(16, THETA), start_pos=60)
    assert torch.equal(a, b) and torch.equal(sa.plan.group_ids, sb.plan.group_ids)
    with pytest.raises(ValueError, match="rope_theta, rope: expected exactly one of them"):
        hga_attention(q, k, v, config=SMALL, rope_theta=THETA, rope=RopeSpec.plain(16, THETA))
    with pytest.raises(ValueError, match="rope_theta, rope: expected exactly one of them"):
        hga_attention(q, k, v, config=SMALL)
    with pytest.raises(ValueError, match="rope: expected a spec for head dim 16 like q, got head_dim=8"):
        hga_attention(q, k, v, config=SMALL, rope=RopeSpec.plain(8, THETA))
    with pytest.raises(TypeError, match="rope: expected a kvtier.rope.RopeSpec, got float"):
        hga_attention(q, k, v, config=SMALL, rope=1e4)  # type: ignore[arg-type]
