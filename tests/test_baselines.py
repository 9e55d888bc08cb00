"""Quest and oracle top-k references: exactness at full budget, budget accounting, causality, errors."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier import HGAConfig
from kvtier.reference.attention import dense_attention_ref
from kvtier.reference.baselines import oracle_attention_ref, quest_attention_ref, routed_keys_for_budget
from kvtier.reference.hga import hga_attention

CFG = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=2, top_groups=3)


def qkv(length: int = 203, hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, length, d, generator=g), torch.randn(2, hkv, length, d, generator=g),
            torch.randn(2, hkv, length, d, generator=g))


@pytest.mark.parametrize("fn", [quest_attention_ref, oracle_attention_ref])
def test_full_budget_equals_dense(fn) -> None:
    q, k, v = qkv()
    out, stats = fn(q, k, v, config=CFG, routed_keys=10_000)
    assert (out - dense_attention_ref(q, k, v)).abs().max().item() < 1e-5
    assert stats.density == pytest.approx(1.0)


def test_decode_offset_equals_prefill_rows() -> None:
    q, k, v = qkv()
    full, _ = oracle_attention_ref(q, k, v, config=CFG, routed_keys=12)
    last, _ = oracle_attention_ref(q[:, :, -5:], k, v, config=CFG, routed_keys=12, start_pos=198)
    assert torch.equal(full[:, :, -5:], last)


def test_same_keys_per_query_as_hga() -> None:
    """At HGA's budget all three attend the same number of keys at every position."""
    q, k, v = qkv()
    routed = CFG.top_groups * CFG.group_size
    _, h = hga_attention(q, k, v, config=CFG, rope_theta=1e4)
    _, qs = quest_attention_ref(q, k, v, config=CFG, routed_keys=routed, page_size=CFG.group_size)
    _, orc = oracle_attention_ref(q, k, v, config=CFG, routed_keys=routed)
    assert torch.equal(h.keys_per_query, qs.keys_per_query)
    assert torch.equal(h.keys_per_query, orc.keys_per_query)
    budget = (CFG.sink_chunks + CFG.local_chunks + 1) * CFG.chunk_size + routed
    assert int(h.keys_per_query.max()) <= budget
    assert routed_keys_for_budget(CFG, budget) == routed


def test_oracle_picks_the_true_top_keys() -> None:
    q, k, v = qkv(length=100, hq=2, hkv=1, seed=3)
    t = 99  # chunk 6: sinks [0,16), candidates [16, 64), local [64, 96), own [96, 100)
    routed = 7
    _, stats = oracle_attention_ref(q[:, :, t:], k, v, config=CFG, routed_keys=routed, start_pos=t)
    assert int(stats.keys_per_query[0, 0, 0]) == 16 + 32 + 4 + routed
    # brute force: the output equals attention over windows + the 7 best candidates
    scores = q[0, 0, t] @ k[0, 0, 16:64].T
    best = 16 + torch.topk(scores, routed).indices
    keep = torch.cat((torch.arange(16), best, torch.arange(64, 100)))
    s = (q[0, 0, t] @ k[0, 0, keep].T) / math.sqrt(16)
    want = torch.softmax(s, -1) @ v[0, 0, keep]
    got, _ = oracle_attention_ref(q[:, :, t:], k, v, config=CFG, routed_keys=routed, start_pos=t)
    assert (got[0, 0, 0] - want).abs().max().item() < 1e-5


def test_quest_bound_is_an_upper_bound() -> None:
    """A page that holds the single best key is always among Quest's picks when one page is allowed."""
    q, k, v = qkv(length=100, hq=2, hkv=1, seed=4)
    t = 99
    k = k.clone()
    k[:, 0, 37] = 4.0 * q[:, 0, t]  # one strong needle key in page [36, 40)
    got, _ = quest_attention_ref(q[:, :, t:], k, v, config=CFG, routed_keys=4, page_size=4, start_pos=t)
    keep = torch.cat((torch.arange(16), torch.arange(36, 40), torch.arange(64, 100)))
    s = (q[0, 0, t] @ k[0, 0, keep].T) / math.sqrt(16)
    want = torch.softmax(s, -1) @ v[0, 0, keep]
    assert (got[0, 0, 0] - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("fn", [quest_attention_ref, oracle_attention_ref])
def test_causal(fn) -> None:
    q, k, v = qkv()
    a, _ = fn(q, k, v, config=CFG, routed_keys=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 150:] += 3.0
    v2[:, :, 150:] -= 1.0
    b, _ = fn(q, k2, v2, config=CFG, routed_keys=8)
    assert torch.equal(a[:, :, :150], b[:, :, :150])


def test_bad_inputs() -> None:
    q, k, v = qkv(length=40)
    with pytest.raises(ValueError, match="expected at least start_pos"):
        oracle_attention_ref(q, k[:, :, :30], v[:, :, :30], config=CFG, routed_keys=4)
    with pytest.raises(ValueError, match="expected a divisor of chunk_size"):
        quest_attention_ref(q, k, v, config=CFG, routed_keys=4, page_size=5)
    with pytest.raises(TypeError, match="expected an HGAConfig"):
        oracle_attention_ref(q, k, v, config=None, routed_keys=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected at least the windows"):
        routed_keys_for_budget(CFG, 10)
