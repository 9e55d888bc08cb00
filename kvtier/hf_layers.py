"""What the layers of a transformers model need besides HGA: layer kinds, masks, exact windowed attention.

Also the per-call reading of an attention module for :mod:`kvtier.hf`: its window, its RoPE
at the call's context length, and the positions of a batch's real tokens.

HGA replaces full causal attention only. A model's other layers keep what they compute:

* **sliding-window layers** (Mistral, Gemma-2/3, gpt-oss, Cohere2 ``layer_types``) run exact
  attention over their window, with the model's own mask, attention sinks (gpt-oss) and logit
  soft-capping (Gemma-2) included (:func:`exact_attention`);
* **full-attention layers** run HGA (sinks and soft-capping included, on the reference
  path); a layer type other than full or sliding is refused by name with
  :class:`kvtier.ConfigError`.

:func:`hga_mask` is the mask function registered for ``"hga"`` with transformers'
``AttentionMaskInterface``: a full-attention layer gets a compact key-padding mask
``[B, Lk]`` (or None without padding), never the ``[B, 1, Lq, Lk]`` tensor a long prefill
could not afford; any other pattern (sliding windows) gets transformers' own boolean mask.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier.errors import ConfigError
from kvtier.reference.attention import masked_attention_ref
from kvtier.rope import RopeSpec, rope_spec_of

__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "layer_types_of",
    "sliding_window_of",
    "layer_window",
    "module_rope",
    "check_row_positions",
    "hga_mask",
    "key_padding_of",
    "exact_attention",
]

#: Layer types kvtier serves: HGA on the first, exact windowed attention on the second.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

# Query rows per block of exact windowed attention: bounds the float32 scores to
# [B, Hq, 256, window + 256] however long the prefill.
_ROWS_PER_BLOCK = 256


def _text_config(config: Any) -> Any:
    if isinstance(config, torch.nn.Module):  # a model: read its config
        config = getattr(config, "config", config)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def sliding_window_of(config: Any) -> int | None:
    """The sliding window (tokens) of a config, or None when it has none that can bite.

    A window at least ``max_position_embeddings`` long never excludes a key (Phi-3-128k's
    262144 over 131072 positions), so it counts as none.
    """
    config = _text_config(config)
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and int(window) >= int(max_pos):
        return None
    return int(window)


def layer_types_of(config: Any) -> tuple[str, ...]:
    """``"full_attention"`` or ``"sliding_attention"`` per layer, as the model runs them.

    From ``layer_types`` when the config has them (Gemma-2/3, gpt-oss, Qwen2, Cohere2);
    otherwise every layer is sliding if the config has a window (Mistral v0.1, Phi-3 style:
    one ``sliding_window`` applied to all layers), else full.

    Raises
    ------
    ConfigError
        A layer type outside :data:`SUPPORTED_LAYER_TYPES` (chunked, linear, recurrent, ...).
    """
    config = _text_config(config)
    n = int(config.num_hidden_layers)
    window = sliding_window_of(config)
    types = getattr(config, "layer_types", None)
    if types:
        types = tuple(str(t) for t in types)
        bad = sorted({t for t in types if t not in SUPPORTED_LAYER_TYPES})
        if bad:
            where = [i for i, t in enumerate(types) if t in bad][:8]
            raise ConfigError(
                f"layer_types: expected only {SUPPORTED_LAYER_TYPES} layers, got {bad} (layers {where}...)"
            )
        if window is None:  # a window that never bites: every layer attends its full causal context
            types = tuple("full_attention" for _ in types)
        return types
    return tuple("sliding_attention" if window is not None else "full_attention" for _ in range(n))


# --------------------------------------------------------------------------- per module, per call


def module_rope(module: Any, seq_len: int, fresh: bool) -> RopeSpec:
    """The RoPE of a full-attention module at a context of ``seq_len`` tokens (cached per regime).

    ``fresh``: the call's keys were all rotated in this call (no cache). A cache that crosses
    longrope's switch holds keys rotated with the other factors, which no summary can undo.
    """
    spec: RopeSpec | None = getattr(module, "_kvtier_rope", None)
    if spec is not None:
        try:
            spec.check_context(seq_len)
            return spec
        except ConfigError:
            if not fresh:
                raise ConfigError(
                    f"rope_type {spec.rope_type!r}: expected a cached context to stay within one set of RoPE "
                    f"frequencies ({spec.min_seq_len} to {spec.max_seq_len} tokens), got {seq_len}: the cache holds "
                    "keys rotated with the other factors; start the sequence past the switch or run it in one call"
                ) from None
    spec = rope_spec_of(module.config, seq_len=seq_len, layer_idx=getattr(module, "layer_idx", None))
    module._kvtier_rope = spec
    return spec


def layer_window(module: Any, kwargs: dict[str, Any]) -> int | None:
    """The window of a sliding-window layer, None for a full-attention layer.

    What the model passes (``sliding_window=``) decides, with the config's ``layer_types``
    for models that pass nothing; a window of at least ``max_position_embeddings`` never bites.
    """
    window = kwargs.get("sliding_window")
    config = getattr(module, "config", None)
    if window is None and config is not None and hasattr(module, "layer_idx"):
        types = layer_types_of(config)
        if types[module.layer_idx] == "sliding_attention":
            window = sliding_window_of(config)
    max_pos = getattr(config, "max_position_embeddings", None)
    if window is not None and max_pos is not None and int(window) >= int(max_pos):
        return None
    return None if window is None else int(window)


def check_row_positions(position_ids: Any, row: int, got: torch.Tensor, first: int) -> None:
    """The real queries of batch row ``row`` must sit at positions ``first, first + 1, ...`` (their ranks)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.numel() == 0:
        return
    pid = position_ids.reshape(-1, position_ids.shape[-1])
    pid = pid[row if pid.shape[0] > 1 else 0, got]
    want = torch.arange(first, first + got.numel(), device=pid.device)
    if not torch.equal(pid.to(want.dtype), want):
        raise ValueError(
            f"position_ids: expected row {row}'s real tokens at positions {first}..{first + got.numel() - 1} "
            f"(their order among the row's real keys; generate passes attention_mask.cumsum(-1) - 1), got "
            f"{int(pid[0])}..{int(pid[-1])}"
        )


# --------------------------------------------------------------------------- masks


def _window_of(mask_function: Any) -> int | None:
    """W when ``mask_function`` is exactly transformers' sliding-window causal function of window W."""
    from transformers.masking_utils import causal_mask_function

    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask" or not mask_function.__closure__:
        return None
    parts = mask_function.__closure__[0].cell_contents
    if not isinstance(parts, tuple) or len(parts) != 2 or parts[1] is not causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask" or not overlay.__closure__:
        return None
    window = overlay.__closure__[0].cell_contents
    return window if isinstance(window, int) else None


def hga_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``"hga"`` entry of transformers' ``AttentionMaskInterface``.

    Returns
    -------
    None
        Plain causal attention without padding.
    Tensor ``[B, Lk]`` bool
        Plain causal attention over a padded batch: True for the keys that are real tokens
        (aligned with the ``Lk = kv_length`` keys the attention function receives). A sliding
        window that covers every key of the call counts as plain causal attention.
    Tensor ``[B, 1, Lq, Lk]`` bool
        Any other pattern (a sliding window, overlays): transformers' own boolean mask.
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    window = _window_of(mask_function)
    # a window covering every key index of this call is plain causal attention (Phi-3's 262144)
    if mask_function is causal_mask_function or (window is not None and window >= q_offset + q_length):
        if attention_mask is None:
            return None
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        assert padding is not None
        padding = padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        return None if bool(padding.all()) else padding
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
        allow_is_causal_skip=False, **kwargs,
    )  # fmt: skip


def key_padding_of(mask: torch.Tensor | None, lq: int, lk: int) -> torch.Tensor | None:
    """The key-padding mask ``[B, Lk]`` (or None) of what a full-attention layer received.

    A ``[B, 1, Lq, Lk]`` mask is accepted only when it is exactly causal attention over the
    real keys (a window that covers the whole context, e.g. Phi-3's), else ``ValueError``.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape[1] != lk:
            raise ValueError(f"attention_mask: expected [B, {lk}] key padding, got {list(mask.shape)}")
        return mask.to(torch.bool)
    if mask.dim() != 4 or mask.shape[-2:] != (lq, lk) or mask.shape[1] != 1 or mask.dtype != torch.bool:
        raise ValueError(
            f"attention_mask: expected None, a [B, {lk}] key padding or a [B, 1, {lq}, {lk}] bool mask on a "
            f"full-attention layer, got {mask.dtype} {list(mask.shape)} (load the model with attn_implementation='hga')"
        )
    keep = mask[:, 0].any(dim=1)  # [B, Lk]: keys some query sees
    qpos = torch.arange(lk - lq, lk, device=mask.device)
    causal = torch.arange(lk, device=mask.device)[None, :] <= qpos[:, None]  # [Lq, Lk]
    # rows of padding queries see nothing useful; only real query rows must be causal & real keys
    real_rows = keep[:, lk - lq :]
    want = causal[None] & keep[:, None, :]
    if not bool(((mask[:, 0] == want) | ~real_rows[:, :, None]).all()):
        raise ValueError(
            "attention_mask: expected causal attention over the real keys on a full-attention layer, got another "
            "pattern (a sliding window shorter than the context, or an overlay); HGA cannot reproduce it"
        )
    return None if bool(keep.all()) else keep


# --------------------------------------------------------------------------- exact attention


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
    keep: torch.Tensor | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact attention of a sliding-window (or otherwise masked) layer, block by block, float32 math.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]``
        Queries; query i sits at key index ``Lk - Lq + i``.
    k, v : Tensor ``[B, Hkv, Lk, D]``
    mask : bool Tensor ``[B, 1, Lq, Lk]``, or None
        The model's own mask (True: attend). None: causal, limited to ``window`` keys and
        to the real keys ``keep``.
    scale : float
        Softmax scale of the model.
    keep : bool Tensor ``[B, Lk]``, optional
        Key padding (True: a real token); only used when ``mask`` is None.
    window : int, optional
        Keys a query sees, itself included (only used when ``mask`` is None).
    sinks : Tensor ``[Hq]``, optional
        Per-head sink logits (gpt-oss): an extra softmax entry with no value.
    softcap : float, optional
        Logit soft-capping ``cap * tanh(s / cap)`` (Gemma-2).

    Returns
    -------
    Tensor ``[B, Hq, Lq, D]`` in ``q.dtype``; rows that see no key are 0.
    """
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    out = torch.zeros_like(q)
    for r0 in range(0, lq, _ROWS_PER_BLOCK):
        r1 = min(lq, r0 + _ROWS_PER_BLOCK)
        if mask is not None:
            vis = mask[:, :, r0:r1].to(torch.bool)
            cols = vis.any(dim=(0, 1, 2)).nonzero()
            if cols.numel() == 0:
                continue
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            vis = vis[..., c0:c1]
        else:
            qidx = torch.arange(lk - lq + r0, lk - lq + r1, device=q.device)
            c0 = 0 if window is None else max(0, lk - lq + r0 - window + 1)
            c1 = lk - lq + r1
            kidx = torch.arange(c0, c1, device=q.device)
            vis = kidx[None, :] <= qidx[:, None]
            if window is not None:
                vis = vis & (qidx[:, None] - kidx[None, :] < window)
            vis = vis[None, None]
            if keep is not None:
                vis = vis & keep[:, None, None, c0:c1]
        blk = masked_attention_ref(
            q[:, :, r0:r1], k[:, :, c0:c1], v[:, :, c0:c1], vis, scale=scale, sinks=sinks, softcap=softcap
        )
        out[:, :, r0:r1] = torch.nan_to_num(blk, nan=0.0)  # rows seeing nothing (left padding)
    return out
