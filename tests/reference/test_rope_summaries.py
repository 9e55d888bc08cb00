"""RoPE apply/invert and mixed-RoPE summaries against scalar brute force."""

from __future__ import annotations

import pytest
import torch

from kvtier.reference import (
    apply_rope,
    chunk_summaries_ref,
    group_summaries_ref,
    invert_rope,
    rope_inv_freq,
    tokenwise_pairs,
)

from .bruteforce import inv_freqs, rotate_pair, unit_summary


def test_apply_rope_matches_scalar_rotation():
    x = torch.randn(5, 16, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 100, 4093])
    inv = rope_inv_freq(16, 1e4)
    got = apply_rope(x, pos, inv)
    for i in range(5):
        assert torch.allclose(got[i], rotate_pair(x[i], float(pos[i]), inv_freqs(16, 1e4)), atol=1e-12)


def test_apply_rope_matches_transformers_convention():
    """Same as the HF rotate_half formula computed in fp32 (cos/sin of position * inv_freq)."""
    d, theta = 64, 1e5
    x = torch.randn(2, 3, 40, d)
    pos = torch.arange(1000, 1040)
    inv32 = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = pos[:, None].float() * inv32[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x.chunk(2, -1)
    hf = x * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()
    assert torch.allclose(apply_rope(x, pos, rope_inv_freq(d, theta)), hf, atol=2e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_invert_rope_round_trip(dtype, tol):
    x = torch.randn(2, 4, 300, 128, dtype=dtype)
    pos = torch.arange(10_000, 10_300)
    inv = rope_inv_freq(128, 1e6)
    back = invert_rope(apply_rope(x, pos, inv), pos, inv)
    assert float((back - x).abs().max()) < tol * float(x.abs().max())


@pytest.mark.parametrize("theta, d, expected", [(1e4, 64, 17), (1e6, 128, 23), (1e6, 64, 12), (1e4, 128, 34)])
def test_tokenwise_pair_counts_match_the_authors(theta, d, expected):
    assert int(tokenwise_pairs(rope_inv_freq(d, theta), 64, 0.5).sum()) == expected


def test_rope_inv_freq_rejects_odd_dim_and_bad_theta():
    with pytest.raises(ValueError, match="head_dim: expected an even number, got 7"):
        rope_inv_freq(7, 1e4)
    with pytest.raises(ValueError, match="rope_theta: expected a positive number"):
        rope_inv_freq(8, -1.0)


@pytest.mark.parametrize("cutoff", [0.0, 0.5, 100.0])  # all token-wise, mixed, all anchored
def test_summaries_match_bruteforce(cutoff):
    c, g, d, theta = 16, 4, 16, 1e4
    k = apply_rope(torch.randn(1, 2, 3 * c, d), torch.arange(3 * c), rope_inv_freq(d, theta))
    inv = rope_inv_freq(d, theta)
    cs = chunk_summaries_ref(k, c, inv, cutoff)
    gsum = group_summaries_ref(k, c, g, inv, cutoff)
    assert cs.shape == (1, 2, 3, d) and gsum.shape == (1, 2, 3, c // g, d)
    freqs = inv_freqs(d, theta)
    for h in range(2):
        for j in range(3):
            want = unit_summary(k[0, h, j * c : (j + 1) * c], j * c, c, freqs, cutoff)
            assert torch.allclose(cs[0, h, j].double(), want, rtol=1e-5, atol=1e-5)
            for m in range(c // g):
                first = j * c + m * g
                want_g = unit_summary(k[0, h, first : first + g], first, c, freqs, cutoff)
                assert torch.allclose(gsum[0, h, j, m].double(), want_g, rtol=1e-5, atol=1e-5)


def test_tokenwise_summary_dot_is_sum_of_logits():
    """In token-wise pairs q . summary equals the sum of the tokens' logits exactly (linearity)."""
    c, d = 64, 32
    inv = rope_inv_freq(d, 1e4)
    k = apply_rope(torch.randn(1, 1, c, d, dtype=torch.float64), torch.arange(c), inv)
    q = torch.randn(d, dtype=torch.float64)
    s = chunk_summaries_ref(k, c, inv, 0.0)[0, 0, 0].double()
    assert torch.allclose(q @ s, (k[0, 0] @ q).sum(), rtol=1e-5)


def test_summaries_with_offset_start_equal_slice_of_full():
    c, d = 8, 16
    inv = rope_inv_freq(d, 1e4)
    k = apply_rope(torch.randn(1, 2, 5 * c, d), torch.arange(5 * c), inv)
    full = chunk_summaries_ref(k, c, inv, 0.5)
    part = chunk_summaries_ref(k[:, :, 2 * c :], c, inv, 0.5, start=2 * c)
    assert torch.allclose(full[:, :, 2:], part, atol=1e-6)
