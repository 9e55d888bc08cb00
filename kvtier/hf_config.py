"""What kvtier reads from a transformers model config: RoPE base, attention geometry, logit features.

Shared by :mod:`kvtier.hf` (which re-exports the public functions) and :mod:`kvtier.hf_cache`.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier.errors import ConfigError
from kvtier.hf_layers import layer_types_of, sliding_window_of

__all__ = ["logit_features_of", "rope_theta_of"]


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def rope_theta_of(config: Any) -> float:
    """RoPE base of a transformers config, refusing anything but plain RoPE.

    Reads transformers 5's ``rope_parameters`` (flat, or one entry per layer type) and the
    older ``rope_theta`` / ``rope_scaling`` attributes.

    Parameters
    ----------
    config : transformers.PretrainedConfig, or a model (its ``config`` is read)

    Returns
    -------
    float
        ``rope_theta`` (SmolLM2: 1e5).

    Raises
    ------
    ConfigError
        If the model uses RoPE scaling (linear, dynamic, YaRN, llama3, ...), a partial
        rotary dim, or has no RoPE base at all: HGA's mixed-RoPE summaries assume
        ``inv_freq[i] = theta ** (-2i / D)`` over the whole head.
    """
    if isinstance(config, torch.nn.Module):  # a model: read its config
        config = getattr(config, "config", config)
    config = _text_config(config)
    params = getattr(config, "rope_parameters", None)
    entries: list[dict[str, Any]] = []
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):
            entries = list(params.values())
        else:
            entries = [params]
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling and scaling not in entries:
        entries.append(scaling)
    thetas = set()
    for entry in entries:
        kind = entry.get("rope_type", entry.get("type", "default"))
        if kind not in ("default", None):
            raise ConfigError(
                f"rope scaling: expected plain RoPE (rope_type 'default'), got {kind!r}; "
                "HGA's summaries assume unscaled frequencies"
            )
        if entry.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(
                f"partial_rotary_factor: expected 1.0, got {entry['partial_rotary_factor']}"
            )
        if entry.get("rope_theta") is not None:
            thetas.add(float(entry["rope_theta"]))
    if getattr(config, "partial_rotary_factor", 1.0) not in (1.0, None):
        raise ConfigError(f"partial_rotary_factor: expected 1.0, got {config.partial_rotary_factor}")
    if getattr(config, "rope_theta", None) is not None and not thetas:
        thetas.add(float(config.rope_theta))
    if len(thetas) != 1:
        raise ConfigError(f"rope_theta: expected one RoPE base in the config, got {sorted(thetas) or 'none'}")
    theta = thetas.pop()
    if not theta > 0:
        raise ConfigError(f"rope_theta: expected a positive number, got {theta}")
    return theta


def _model_geometry(config: Any, *, allow_sliding: bool = False) -> tuple[int, int, int, int]:
    """``(num_layers, num_q_heads, num_kv_heads, head_dim)`` of a decoder config (a model is read through its config).

    Refuses sliding-window layers unless ``allow_sliding``, and always a model whose every
    layer is sliding (nothing for HGA to serve).
    """
    if isinstance(config, torch.nn.Module):
        config = getattr(config, "config", config)
    config = _text_config(config)
    try:
        layers = int(config.num_hidden_layers)
        hq = int(config.num_attention_heads)
        hkv = int(getattr(config, "num_key_value_heads", None) or hq)
        d = int(getattr(config, "head_dim", None) or config.hidden_size // hq)
    except AttributeError as exc:
        raise ConfigError(f"model config: expected a decoder config with heads and layers, got {exc}") from None
    if hq % hkv != 0:
        raise ConfigError(f"num_key_value_heads: expected a divisor of {hq} query heads, got {hkv}")
    types = layer_types_of(config)
    if allow_sliding and "full_attention" not in types:
        raise ConfigError(
            f"layer_types: TieredCache expected at least one 'full_attention' layer for HGA, got only sliding-window "
            f"layers (window {sliding_window_of(config)}); use transformers' own cache (kvtier runs them exactly)"
        )
    if not allow_sliding and any(t != "full_attention" for t in types):
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        raise ConfigError(
            f"layer_types: TieredCache expected only 'full_attention' layers, got sliding-window layers {sliding} "
            f"(window {sliding_window_of(config)}); run such models without a TieredCache (exact windowed attention "
            "on sliding layers, HGA on full ones)"
        )
    return layers, hq, hkv, d


def logit_features_of(config: Any) -> tuple[str, ...]:
    """What a model adds to its attention logits: ``"attention sinks"`` (gpt-oss), ``"logit soft-capping"``
    (Gemma-2's ``attn_logit_softcapping``); empty for plain softmax attention.

    The engine's torch flow and the HGA reference have both, the kernels neither.
    """
    if isinstance(config, torch.nn.Module):
        config = getattr(config, "config", config)
    config = _text_config(config)
    found = []
    if getattr(config, "model_type", None) == "gpt_oss":  # a learned sink logit per head (module.sinks)
        found.append("attention sinks")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        found.append("logit soft-capping")
    return tuple(found)
