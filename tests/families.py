"""Tiny random-weight configs of the model families people run, each with its real RoPE and layer settings.

Sizes are shrunk (hidden 64, 2 layers, 4 query heads over 2 KV heads, head dim 16) and so
are the windows and the pretraining lengths the RoPE schemes key on, so that a context of
a few hundred tokens crosses the sliding window and longrope's switch; the RoPE types,
factors, layer-type patterns, sinks and partial rotary dims are the families' own.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
WINDOW = 48  # sliding window of the tiny sliding-window families (tokens)


def _phi_factors(n: int, base: float, step: float) -> list[float]:
    return [base + step * i for i in range(n)]


#: family -> (config class, causal-LM class, config kwargs, what it stands for)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(
        max_position_embeddings=131072,
        rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ), "Llama-3.1/3.2/3.3"),
    "qwen2.5-yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        max_position_embeddings=131072,
        rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768),
    ), "Qwen2.5 with YaRN (Qwen3 uses the same scheme)"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        max_position_embeddings=131072, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)},
    ), "Gemma-3 (linear RoPE on full layers, sliding layers)"),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        max_position_embeddings=4096, original_max_position_embeddings=128,
        rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=_phi_factors(8, 1.0, 0.05),
                             long_factor=_phi_factors(8, 1.0, 1.5)),
    ), "Phi-3-128k (longrope; pretraining length shrunk to 128 so the long factors are exercised)"),
    "phi4mini-partial": ("Phi3Config", "Phi3ForCausalLM", dict(
        max_position_embeddings=4096, original_max_position_embeddings=128,
        rope_parameters=dict(rope_type="longrope", rope_theta=1e4, partial_rotary_factor=0.75,
                             short_factor=_phi_factors(6, 1.0, 0.05), long_factor=_phi_factors(6, 1.0, 1.5)),
    ), "Phi-4-mini (longrope over 3/4 of the head)"),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        max_position_embeddings=131072, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=4096),
    ), "gpt-oss (YaRN, sliding layers, attention sinks)"),
    "mistral-v0.1": ("MistralConfig", "MistralForCausalLM", dict(
        max_position_embeddings=32768, sliding_window=WINDOW, rope_theta=1e4,
    ), "Mistral-7B v0.1 (every layer sliding)"),
    "glm4-partial": ("GlmConfig", "GlmForCausalLM", dict(
        max_position_embeddings=131072, partial_rotary_factor=0.5, rope_theta=1e4,
    ), "GLM-4 (interleaved pairs over half the head)"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        max_position_embeddings=8192, sliding_window=WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"], rope_theta=1e4,
    ), "Gemma-2 (logit soft-capping on every layer)"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(
        max_position_embeddings=8192, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_theta=5e4,
    ), "Cohere2 / Command-R7B (sliding layers with RoPE, full layers without)"),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(
        max_position_embeddings=4096, rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0),
    ), "dynamic NTK (served within max_position_embeddings)"),
}


def family_config(name: str, **extra: Any) -> Any:
    """A fresh config of family ``name`` (a deep copy each call: ``from_config`` writes into it)."""
    import transformers

    cfg_cls, _, kwargs, _ = FAMILIES[name]
    kw = {**COMMON, **copy.deepcopy(kwargs), **extra}
    return getattr(transformers, cfg_cls)(**kw)


def family_model(name: str, attn_implementation: str = "hga", **extra: Any) -> torch.nn.Module:
    """Random-weight model of family ``name`` in float32, eval mode, seeded."""
    import transformers

    _, model_cls, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    config = family_config(name, **extra)
    model = getattr(transformers, model_cls)._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    return model.eval()


def padded_batch(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask, position_ids)`` of a padded batch, as a tokenizer and generate make them.

    ``side`` is "left" or "right"; padding ids are 0 and padding positions are clamped to 0.
    """
    n = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - r.numel(), n) if side == "left" else slice(0, r.numel())
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)
