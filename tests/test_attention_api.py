"""Edges of the public attention API: the start_pos default, scale=, and [B, L, H, D] inputs."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier import HGAConfig
from kvtier.reference import dense_attention_ref
from kvtier.reference import hga_attention as hga_ref

CFG = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=1, top_chunks=2, top_groups=3, fetch_groups=4)
THETA = 1e4


def _qkv(b=2, hq=4, hkv=2, length=83, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, length, d, generator=g)
    k = torch.randn(b, hkv, length, d, generator=g)
    return q, k, torch.randn(b, hkv, length, d, generator=g)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_queries_default_to_the_last_positions(backend):
    """A decode call q[:, :, -1:] over all keys is the last row of the whole prefill, not position 0."""
    q, k, v = _qkv(b=2, length=67)
    whole, whole_stats = hga_ref(q, k, v, config=CFG, rope_theta=THETA)
    for tail in (1, 6):  # one decode step; a block that starts inside a chunk
        out, stats = kvtier.hga_attention(q[:, :, -tail:], k, v, config=CFG, rope_theta=THETA, backend=backend)
        torch.testing.assert_close(out, whole[:, :, -tail:], atol=1e-5, rtol=1e-5)
        assert torch.equal(stats.context_per_query.cpu(), whole_stats.context_per_query[-tail:])
        assert torch.equal(stats.keys_per_query.cpu(), whole_stats.keys_per_query[:, :, -tail:])
    # the reference spells the same default
    out, _ = hga_ref(q[:, :, -1:], k, v, config=CFG, rope_theta=THETA)
    torch.testing.assert_close(out, whole[:, :, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scale_is_the_softmax_scale(backend):
    q, k, v = _qkv(b=1, length=40)
    full = HGAConfig.full_coverage(chunk_size=16, group_size=4)
    out, _ = kvtier.hga_attention(q, k, v, config=full, rope_theta=THETA, scale=0.07, backend=backend)
    torch.testing.assert_close(out, dense_attention_ref(q, k, v, scale=0.07), atol=1e-5, rtol=1e-5)
    default, _ = kvtier.hga_attention(q, k, v, config=full, rope_theta=THETA, backend=backend)
    torch.testing.assert_close(default, dense_attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
    assert (out - default).abs().max() > 1e-2  # the scale really reached the softmax
    # sparse: the kernels and the reference agree at a non-default scale too
    got, _ = kvtier.hga_attention(q, k, v, config=CFG, rope_theta=THETA, scale=0.4, backend=backend)
    want, _ = hga_ref(q, k, v, config=CFG, rope_theta=THETA, scale=0.4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), "0.1", True])
def test_bad_scale(scale):
    q, k, v = _qkv(b=1, length=8)
    with pytest.raises(ValueError, match="scale: expected a positive number or None, got"):
        kvtier.hga_attention(q, k, v, config=CFG, rope_theta=THETA, scale=scale)


def test_bhld_inputs_get_a_transpose_hint():
    q, k, v = _qkv(b=1, hq=4, hkv=2, length=40)
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, D]
    with pytest.raises(ValueError, match=r"expected \[B, H, L, D\], got q \[1, 40, 4, 16\] and k \[1, 40, 2, 16\], "
                                         r"which look like \[B, L, H, D\]: transpose\(1, 2\)\?"):
        kvtier.hga_attention(q_, k_, v_, config=CFG, rope_theta=THETA)
    with pytest.raises(ValueError, match=r"KV heads dividing 1 query heads, got 40; expected \[B, H, L, D\]"):
        kvtier.hga_attention(q_[:, -1:], k_, v_, config=CFG, rope_theta=THETA)  # a decode step, transposed
    # more heads than keys: a bad call gets the hint (it is only a hint), a good one runs
    q, k, v = _qkv(b=1, hq=8, hkv=8, length=4)
    with pytest.raises(ValueError) as info:
        kvtier.hga_attention(q, k[:, :, :2], v[:, :, :2], config=CFG, rope_theta=THETA, start_pos=0)
    assert "key positions, got 2; expected [B, H, L, D]" in str(info.value)
    out, _ = kvtier.hga_attention(q, k, v, config=CFG, rope_theta=THETA)
    assert out.shape == q.shape
