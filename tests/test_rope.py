"""kvtier.rope: the RoPE transformers computes, read from the model's own rotary embedding."""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvtier.errors import ConfigError  # noqa: E402
from kvtier.reference import apply_rope  # noqa: E402
from kvtier.rope import RopeSpec, rope_spec_of  # noqa: E402

from .families import FAMILIES, family_config, family_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_spec_rotates_as_the_model(name: str) -> None:
    """apply_rope with rope_spec_of(config, seq_len) equals the model's own RoPE at every position.

    300 tokens cross the tiny longrope models' pretraining length (128): their long factors.
    """
    rotary = family_model(name, attn_implementation="eager").model.rotary_emb
    apply_fn = sys.modules[type(rotary).__module__].apply_rotary_pos_emb
    kw = {"layer_type": "full_attention"} if isinstance(rotary.rope_type, dict) else {}
    for length in (100, 300):
        positions = torch.arange(length)
        q = torch.randn(1, 2, length, 16, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            cos, sin = rotary(q, positions[None], **kw)
            want = apply_fn(q, q, cos, sin)[0]
        # Cohere2 rotates only its sliding layers (its full layers carry no RoPE: see below)
        lt = "sliding_attention" if name == "cohere2" else None
        spec = rope_spec_of(family_config(name), seq_len=length, layer_type=lt)
        assert spec.head_dim == 16
        got = apply_rope(q.double(), positions, spec)
        assert (got - want.double()).abs().max().item() < 1e-4, length  # float32 angles at position < 300


def test_spec_from_a_model_equals_spec_from_its_config() -> None:
    model = family_model("gpt-oss", attn_implementation="eager")
    a, b = rope_spec_of(model), rope_spec_of(model.config)
    assert torch.equal(a.inv_freq, b.inv_freq) and a.attention_scaling == b.attention_scaling
    assert a.attention_scaling > 1.3  # YaRN's magnitude factor at factor 32


def test_what_each_family_carries() -> None:
    glm = rope_spec_of(family_config("glm4-partial"))
    assert glm.interleaved and glm.rotary_dim == 8
    phi = rope_spec_of(family_config("phi4mini-partial"))
    assert not phi.interleaved and phi.rotary_dim == 12 and phi.max_seq_len == 128
    long = rope_spec_of(family_config("phi4mini-partial"), seq_len=129)
    assert long.min_seq_len == 129 and long.max_seq_len is None
    assert not torch.equal(long.inv_freq, phi.inv_freq)
    nope = rope_spec_of(family_config("cohere2"))  # full-attention layers: no RoPE, every dim position-free
    assert nope.rotary_dim == 0 and nope.rope_type == "none"
    assert rope_spec_of(family_config("cohere2"), layer_idx=0).rotary_dim == 16  # layer 0 is sliding
    gemma = rope_spec_of(family_config("gemma3"))  # the full-attention layers' RoPE, not the sliding layers'
    assert gemma.rope_type == "linear"
    assert rope_spec_of(family_config("gemma3"), layer_type="sliding_attention").rope_type == "default"


def test_plain_matches_default_rope() -> None:
    spec = rope_spec_of(family_config("mistral-v0.1"))
    assert spec.rope_type == "default" and spec.attention_scaling == 1.0
    assert torch.allclose(spec.inv_freq, RopeSpec.plain(16, 1e4).inv_freq, rtol=1e-6)


def test_refusals_name_the_feature() -> None:
    with pytest.raises(ConfigError, match=r"rope_type 'dynamic': expected a context of 0 to 4096 tokens .*got 5000"):
        rope_spec_of(family_config("llama-dynamic"), seq_len=5000)
    short = rope_spec_of(family_config("phi3-longrope"), seq_len=100)
    with pytest.raises(ConfigError, match=r"rope_type 'longrope': expected a context of 0 to 128 tokens"):
        short.check_context(129)
    with pytest.raises(ConfigError, match="expected a transformers model or config, got dict"):
        rope_spec_of({"rope_theta": 1e4})
    with pytest.raises(ConfigError, match="expected layer type 'chunked_attention'"):
        rope_spec_of(family_config("gemma3"), layer_type="chunked_attention")
    cfg = family_config("llama3.1")
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_type": "proportional"}
    with pytest.raises(ConfigError, match=r"rope_type: expected one of \('default', 'linear', 'llama3', 'yarn', "
                                          r"'longrope', 'dynamic'\), got 'proportional'"):
        rope_spec_of(cfg)


def test_multi_head_latent_attention_is_refused_by_name() -> None:
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, pad_token_id=0,
    )
    with pytest.raises(ConfigError, match=r"multi-head latent attention \(DeepSeek-V2/V3 style, qk_rope_head_dim=8\)"):
        rope_spec_of(cfg)
