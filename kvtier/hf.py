"""Hugging Face transformers integration: the attention implementation ``"hga"`` and :class:`TieredCache`.

Importing this module registers ``"hga"`` with ``transformers.AttentionInterface``; a model
loaded with ``attn_implementation="hga"`` then runs Hierarchical Global Attention with its
own weights, unchanged::

    import kvtier.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hga")
    cache = kvtier.hf.TieredCache(model.config, store=kvtier.StoreConfig(host_bytes="2GiB", disk_dir=d))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

Two paths, one result:

* **With a TieredCache** (generation): a thin adapter over :class:`kvtier.engine.HGAEngine`.
  Closed chunks (64 tokens per layer, ``[2, Hkv, C, D]``) go to a :class:`kvtier.TieredStore`
  (host tier, disk tier); the compute device keeps the chunk and group summaries, the sink
  chunks, the local window, the open chunk and (CUDA) a group cache; for each block of
  queries that share a chunk, the routed groups are gathered from the host slab by slot and
  exact softmax attention runs over sinks + local window + routed groups + the causal part
  of the current chunk.
* **Without a cache, or with a transformers cache** (teacher-forced scoring): the full K/V
  arrives and the function calls HGA over it directly (``kvtier.hga_attention`` when the
  kernels are there, the reference otherwise); ``configure(model, method="quest" | "oracle")``
  swaps in the baselines of :mod:`kvtier.reference.baselines` at the same budget.

Routing is per position (see :mod:`kvtier.reference.hga`), so a prompt fed in pieces, or
one token at a time, gives the same result as one prefill, and with budgets covering the
context the output equals dense causal attention.

Cache-less path: decoder-only models with the RoPE schemes of :mod:`kvtier.rope` (read from
the model) and GQA; full-attention layers run HGA, sliding-window layers exact windowed
attention (:mod:`kvtier.hf_layers`); padded batches (each row over its own real keys);
families and refusals in docs/hf.md. TieredCache: full-attention layers through the engine
(sliding ones as transformers' window layers), RoPE with fixed frequencies, batches of equal
length (one engine) or padded (one engine per row, :mod:`kvtier.rows`). transformers 5.17 to
5.24, CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from kvtier.config import HGAConfig
from kvtier.errors import ConfigError
from kvtier.hf_cache import _MARK, TieredCache, TieredLayer
from kvtier.hf_config import logit_features_of, rope_theta_of
from kvtier.hf_layers import (
    check_row_positions,
    exact_attention,
    hga_mask,
    key_padding_of,
    layer_window,
    module_rope,
)
from kvtier.reference.hga import RouteCarry
from kvtier.rope import RopeSpec

__all__ = [
    "ATTN_IMPLEMENTATION",
    "METHODS",
    "AttentionStats",
    "TieredCache",
    "cache_kwargs",
    "configure",
    "hga_attention_forward",
    "logit_features_of",
    "register",
    "rope_theta_of",
]

#: Name under which the attention function is registered with transformers.
ATTN_IMPLEMENTATION = "hga"
#: Attention methods :func:`configure` accepts for the cache-less path.
METHODS = ("hga", "quest", "oracle", "dense")

_SETTINGS = "_kvtier_settings"  # attribute configure() puts on each attention module


# --------------------------------------------------------------------------- statistics


@dataclass
class AttentionStats:
    """Running totals of what attention calls attended, over layers, heads and queries.

    Attributes
    ----------
    queries : int
        Query rows counted (one per batch element, query head, position and layer).
    keys : int
        Keys attended, summed over those rows (sinks, local window, routed keys and the
        causal part of the current chunk included).
    density_sum : float
        Sum over rows of keys attended / causal context length.
    """

    queries: int = 0
    keys: int = 0
    density_sum: float = 0.0

    def add(self, keys_per_query: torch.Tensor, context_per_query: torch.Tensor) -> None:
        """Add one call: ``keys_per_query [B, Hq, Lq]``, ``context_per_query [Lq]``."""
        k = keys_per_query.detach().to("cpu", torch.float64)
        ctx = context_per_query.detach().to("cpu", torch.float64)
        self.queries += k.numel()
        self.keys += int(k.sum())
        self.density_sum += float((k / ctx).sum())

    @property
    def mean_keys_per_query(self) -> float:
        """Keys attended per query, averaged (0.0 before any call)."""
        return self.keys / self.queries if self.queries else 0.0

    @property
    def density(self) -> float:
        """Mean of keys attended / context length (1.0 is dense; 0.0 before any call)."""
        return self.density_sum / self.queries if self.queries else 0.0

    def reset(self) -> None:
        """Zero every counter."""
        self.queries, self.keys, self.density_sum = 0, 0, 0.0


@dataclass
class _Settings:
    """What the cache-less path runs for one model (set by :func:`configure`)."""

    hga: HGAConfig
    method: str
    routed_keys: int | None
    backend: str = "auto"  # of kvtier.hga_attention: "auto", "triton" or "reference"
    stats: AttentionStats = field(default_factory=AttentionStats)
    # Per layer, the routing carry of the last call (running chunk scores over a growing
    # transformers cache, where each call brings the next positions of a chunk).
    carries: dict[int, RouteCarry | None] = field(default_factory=dict)


def configure(
    model: Any, *, hga: HGAConfig | None = None, method: str = "hga", routed_keys: int | None = None,
    backend: str = "auto",
) -> AttentionStats:
    """Choose what ``"hga"`` attention computes when no :class:`TieredCache` is passed.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Loaded with ``attn_implementation="hga"``.
    hga : HGAConfig, optional
        Budgets and windows; the paper's defaults when omitted.
    method : {"hga", "quest", "oracle", "dense"}
        ``"quest"`` and ``"oracle"`` use the same sinks, local window and current chunk as
        HGA plus ``routed_keys`` more keys per query (Quest pages or true top-k keys);
        ``"dense"`` is exact causal attention (the reference, float32).
    routed_keys : int, optional
        Keys per query beyond the windows for quest/oracle; defaults to HGA's
        ``top_groups * group_size`` so that all three attend the same number.
    backend : {"auto", "triton", "reference"}
        Path of ``method="hga"`` (:func:`kvtier.hga_attention`): "auto" runs the kernels on
        CUDA where they serve the routing option, the reference otherwise; "reference"
        forces the spec (what the fidelity tables measure on every device).

    Returns
    -------
    AttentionStats
        Accumulates keys per query and density over every following call.

    Raises
    ------
    ValueError
        On an unknown method or a model without attention modules.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    hga = HGAConfig() if hga is None else hga
    if not isinstance(hga, HGAConfig):
        raise TypeError(f"hga: expected an HGAConfig, got {type(hga).__name__}")
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'reference', got {backend!r}")
    if routed_keys is None:
        routed_keys = hga.top_groups * hga.group_size
    settings = _Settings(hga=hga, method=method, routed_keys=routed_keys, backend=backend)
    found = 0
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "num_key_value_groups"):
            setattr(module, _SETTINGS, settings)
            found += 1
    if found == 0:
        raise ValueError(f"model: expected attention modules with layer_idx, got none in {type(model).__name__}")
    return settings.stats


def cache_kwargs(model: Any, cache: Cache) -> dict[str, Cache]:
    """``{"cache": cache}`` where the model's forward takes ``cache`` (transformers 5.24), else ``past_key_values``.

    transformers 5.24 renamed the keyword and still accepts the old one with a
    FutureWarning; 5.17 silently ignores the new one, which would run without the cache.
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}



# --------------------------------------------------------------------------- attention function


def _full_context_hga(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: HGAConfig, rope: RopeSpec, start: int,
    carry: RouteCarry | None = None, *, sinks: torch.Tensor | None = None, softcap: float | None = None,
    backend: str = "auto",
):
    """HGA over the full K/V: the kernels on CUDA where they serve ``cfg``, the reference otherwise
    and for sinks / soft-capping (the kernels have neither: on CUDA such a layer runs the
    reference's torch ops, slower)."""
    from kvtier.attention import hga_attention, kernels_route

    if backend == "auto" and (sinks is not None or softcap is not None):
        backend = "reference"
    if backend == "auto" and not kernels_route(cfg):
        backend = "reference"  # a routing option the kernels do not compute yet
    return hga_attention(
        q, k, v, config=cfg, rope=rope, start_pos=start, route_carry=carry, sinks=sinks, softcap=softcap,
        backend=backend,
    )


def _hga_layer(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None,
    settings: _Settings, kwargs: dict[str, Any],
) -> torch.Tensor:
    """A full-attention layer through HGA (or a baseline); each padded row on its own real keys."""
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    position_ids = kwargs.get("position_ids")
    if keep is None:
        rows = [(slice(None), torch.arange(lk, device=key.device), torch.arange(lq, device=key.device))]
    else:
        rows = [(i, keep[i].nonzero().squeeze(1), keep[i, lk - lq :].nonzero().squeeze(1)) for i in range(b)]
    seq_len = max(int(r[1].numel()) for r in rows)
    out = torch.zeros_like(query)
    for i, kidx, qidx in rows:
        if qidx.numel() == 0:
            continue  # a row whose queries are all padding
        start = kidx.numel() - qidx.numel()
        rows_to_check = range(b) if keep is None else [i]  # without padding every row sits at the same positions
        for r in rows_to_check:
            check_row_positions(position_ids, r, qidx, start)
        sl = slice(i, i + 1) if keep is not None else i
        if keep is None:  # no copy of the context
            q_i, k_i, v_i = query, key, value
        else:
            q_i, k_i, v_i = query[sl][:, :, qidx], key[sl][:, :, kidx], value[sl][:, :, kidx]
        if settings.method == "hga":
            cid = module.layer_idx if keep is None else (module.layer_idx, i)
            carry = settings.carries.get(cid) if start % settings.hga.chunk_size else None
            o, stats = _full_context_hga(
                q_i, k_i, v_i, settings.hga, module_rope(module, seq_len, fresh=lq == lk), start, carry,
                sinks=kwargs.get("s_aux"), softcap=kwargs.get("softcap"), backend=settings.backend,
            )
            settings.carries[cid] = stats.plan.carry
        else:
            from kvtier.reference import baselines

            fn = baselines.quest_attention_ref if settings.method == "quest" else baselines.oracle_attention_ref
            o, stats = fn(q_i, k_i, v_i, config=settings.hga, routed_keys=settings.routed_keys, start_pos=start)
        if keep is None:
            out = o
        else:
            out[sl][:, :, qidx] = o
        settings.stats.add(stats.keys_per_query, stats.context_per_query)
    return out


def hga_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``"hga"``: transformers calls it in every attention layer.

    Full-attention layers run HGA (or the baseline :func:`configure` chose); sliding-window
    layers run exact windowed attention with the model's own mask, sinks and soft-capping.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (its ``config`` gives the RoPE, the layer types and the window).
    query : Tensor ``[B, Hq, Lq, D]``
        Post-RoPE queries.
    key, value : Tensor ``[B, Hkv, Lk, D]``
        Post-RoPE keys and values: the new tokens' only when a :class:`TieredCache`
        returned them, else the whole context (the queries are its last Lq positions).
    attention_mask : None or Tensor
        From :func:`kvtier.hf_layers.hga_mask` (registered for ``"hga"``): None (no padding),
        a ``[B, Lk]`` key-padding mask on full-attention layers, or a ``[B, 1, Lq, Lk]`` bool
        mask for sliding windows. Padding keys are never attended, routed or summarised: each
        padded row runs HGA over its own real keys, at the positions ``position_ids`` gives.
    scaling : float, optional
        Softmax scale; ``D ** -0.5`` when omitted. HGA takes any scale (it scales the queries:
        a positive factor leaves every routing choice unchanged).
    dropout : float
        Must be 0 (HGA has no attention dropout).
    **kwargs
        ``sliding_window``, ``s_aux`` (gpt-oss sinks), ``softcap`` (Gemma-2), ``position_ids``
        as the model passes them.

    Returns
    -------
    out : Tensor ``[B, Lq, Hq, D]``
    weights : None

    Raises
    ------
    ConfigError
        A RoPE the integration cannot serve; sinks or soft-capping with the quest / oracle baselines.
    ValueError
        Dropout, a mask HGA cannot reproduce, or padded positions that are not each row's ranks.
    """
    if dropout:
        raise ValueError(f"dropout: expected 0.0 (HGA has no attention dropout), got {dropout}")
    d = query.shape[-1]
    scale = d**-0.5 if scaling is None else float(scaling)
    layer = getattr(key, _MARK, None)
    if isinstance(layer, TieredLayer):
        keep = key_padding_of(attention_mask, query.shape[2], layer.get_seq_length())
        out = layer.attend(
            query, scale, keep=keep, position_ids=kwargs.get("position_ids"), sinks=kwargs.get("s_aux"),
            softcap=kwargs.get("softcap"),
        )
        return out.transpose(1, 2).contiguous(), None
    settings: _Settings | None = getattr(module, _SETTINGS, None)
    if settings is None:
        settings = _Settings(hga=HGAConfig(), method="hga", routed_keys=None)
        setattr(module, _SETTINGS, settings)
    lq, lk = query.shape[2], key.shape[2]
    if lk < lq:
        raise ValueError(f"key: expected at least Lq={lq} positions, got {lk}")
    window = layer_window(module, kwargs)
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")
    if window is not None:  # a sliding-window layer: exact, with the model's own mask
        four_d = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
        mask = attention_mask if four_d else None
        keep = None if four_d else key_padding_of(attention_mask, lq, lk)
        out = exact_attention(
            query, key, value, mask=mask, keep=keep, scale=scale, window=window, sinks=sinks, softcap=softcap
        )
        return out.transpose(1, 2).contiguous(), None
    if (sinks is not None or softcap is not None) and settings.method in ("quest", "oracle"):
        raise ConfigError(
            f"method {settings.method!r}: expected a model without attention sinks or soft-capping on full-attention "
            "layers (the baselines have neither), got them; use method 'hga' or 'dense'"
        )
    keep = key_padding_of(attention_mask, lq, lk)
    if settings.method == "dense":
        qpos = torch.arange(lk - lq, lk, device=key.device)
        causal = (torch.arange(lk, device=key.device)[None, :] <= qpos[:, None])[None, None]
        mask = causal if keep is None else causal & keep[:, None, None, :]
        out = exact_attention(query, key, value, mask=mask, scale=scale, sinks=sinks, softcap=softcap)
        count = mask.expand(query.shape[0], query.shape[1], lq, lk).sum(dim=-1)
        settings.stats.add(count, torch.arange(lk - lq + 1, lk + 1, device=key.device))
        return out.transpose(1, 2).contiguous(), None
    # HGA routes by q . summary / sqrt(D): a positive factor on q moves no routing choice.
    q = query if math.isclose(scale, d**-0.5, rel_tol=1e-6) else query * (scale * math.sqrt(d))
    out = _hga_layer(module, q, key, value, keep, settings, kwargs)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"hga"`` with transformers' attention and mask interfaces (done on import; harmless again)."""
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hga_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hga_mask)


register()
