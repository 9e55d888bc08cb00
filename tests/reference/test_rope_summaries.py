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

from .bruteforce import half_pairs, interleaved_pairs, inv_freqs, rotate_pair, unit_summary


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


# ---------------------------------------------------------------- the model families' RoPE (kvtier.rope.RopeSpec)


def _family_spec(name, **kw):
    pytest.importorskip("transformers")
    from kvtier.rope import rope_spec_of

    from ..families import family_config

    return rope_spec_of(family_config(name), **kw)


def _pairs(spec):
    return interleaved_pairs(spec.rotary_dim) if spec.interleaved else half_pairs(spec.head_dim, spec.rotary_dim)


FAMILY_SPECS = [
    ("llama3.1", {}), ("qwen2.5-yarn", {}), ("gemma3", {}), ("phi3-longrope", {}), ("phi3-longrope", {"seq_len": 300}),
    ("phi4mini-partial", {"seq_len": 300}), ("gpt-oss", {}), ("glm4-partial", {}), ("llama-dynamic", {}),
]


@pytest.mark.parametrize("name, kw", FAMILY_SPECS, ids=[f"{n}{'-long' if kw else ''}" for n, kw in FAMILY_SPECS])
def test_family_summaries_match_bruteforce(name, kw):
    """Mixed-RoPE summaries with each family's real per-pair frequencies, partial and interleaved layouts included."""
    spec = _family_spec(name, **kw)
    c, g, start = 16, 4, 32
    d = spec.head_dim
    k = apply_rope(torch.randn(1, 2, 2 * c, d, dtype=torch.float64), torch.arange(start, start + 2 * c), spec)
    cs = chunk_summaries_ref(k, c, spec, 0.5, start=start)
    gs = group_summaries_ref(k, c, g, spec, 0.5, start=start)
    freqs, pairs = spec.inv_freq.tolist(), _pairs(spec)
    tokenwise = tokenwise_pairs(spec, c, 0.5)
    assert 0 < int(tokenwise.sum()) < len(freqs)  # the cut-off splits the pairs: both branches are exercised
    for h in range(2):
        for j in range(2):
            first = start + j * c
            want = unit_summary(k[0, h, j * c : (j + 1) * c], first, c, freqs, 0.5, pairs)
            assert torch.allclose(cs[0, h, j].double(), want, rtol=1e-5, atol=1e-5), (h, j)
            for m in range(c // g):
                want_g = unit_summary(k[0, h, j * c + m * g : j * c + (m + 1) * g], first + m * g, c, freqs, 0.5, pairs)
                assert torch.allclose(gs[0, h, j, m].double(), want_g, rtol=1e-5, atol=1e-5), (h, j, m)


def test_scaled_frequencies_are_the_models():
    """llama3 keeps fast pairs and slows the slowest 8x; linear slows all 8x, so fewer pairs are token-wise."""
    llama3 = _family_spec("llama3.1")
    plain = rope_inv_freq(16, 5e5)
    assert torch.allclose(llama3.inv_freq[:2], plain[:2], rtol=1e-6)  # wavelength < 2048: unchanged
    assert torch.allclose(llama3.inv_freq[-1], plain[-1] / 8, rtol=1e-6)  # wavelength > 8192: / factor
    gemma = _family_spec("gemma3")
    assert torch.allclose(gemma.inv_freq, rope_inv_freq(16, 1e6) / 8, rtol=1e-6)
    assert int(tokenwise_pairs(gemma, 64, 0.5).sum()) < int(tokenwise_pairs(rope_inv_freq(16, 1e6), 64, 0.5).sum())


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 12, 8])
def test_partial_rotary_round_trip_and_bruteforce(rotary_dim, interleaved):
    from kvtier.rope import RopeSpec

    d = 16
    inv = torch.tensor([0.9 ** (3 * i) for i in range(rotary_dim // 2)], dtype=torch.float64)
    spec = RopeSpec(d, inv, attention_scaling=1.3, interleaved=interleaved)
    x = torch.randn(3, 40, d, dtype=torch.float64)
    pos = torch.arange(500, 540)
    y = apply_rope(x, pos, spec)
    assert torch.allclose(invert_rope(y, pos, spec), x, atol=1e-12)
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])  # position-free dims, not even the magnitude factor
    pairs = interleaved_pairs(rotary_dim) if interleaved else half_pairs(d, rotary_dim)
    scale = torch.tensor([1.3] * rotary_dim + [1.0] * (d - rotary_dim), dtype=torch.float64)
    want = torch.stack([scale * rotate_pair(x[0, t], float(pos[t]), inv.tolist(), pairs) for t in range(40)])
    assert torch.allclose(y[0], want, atol=1e-12)
    k = y[:1, None, :32]  # [1, 1, 32, D] at positions 500..531; a chunk starts at 496 in geometry, 500 here on purpose
    s = chunk_summaries_ref(k, 16, spec, 0.5, start=500)
    for j in range(2):
        ref = unit_summary(k[0, 0, j * 16 : (j + 1) * 16], 500 + j * 16, 16, inv.tolist(), 0.5, pairs)
        assert torch.allclose(s[0, 0, j].double(), ref, atol=1e-9)
    assert torch.allclose(s[0, 0, :, rotary_dim:].double(), k[0, 0, :, rotary_dim:].reshape(2, 16, -1).sum(1))


def test_spec_errors():
    from kvtier.rope import RopeSpec

    with pytest.raises(ValueError, match="expected at most head_dim / 2 = 4 pairs, got 5"):
        RopeSpec(8, torch.ones(5))
    with pytest.raises(ValueError, match="rope: expected a spec for head dim 16, got head_dim=8"):
        apply_rope(torch.randn(2, 16), torch.arange(2), RopeSpec.plain(8, 1e4))
    with pytest.raises(ValueError, match=r"rope: expected a RopeSpec or an inv_freq tensor \[8\]"):
        apply_rope(torch.randn(2, 16), torch.arange(2), torch.ones(4))
