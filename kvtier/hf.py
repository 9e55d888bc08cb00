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
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvtier.config import HGAConfig, StoreConfig
from kvtier.errors import ConfigError
from kvtier.hf_layers import (
    check_row_positions,
    exact_attention,
    hga_mask,
    key_padding_of,
    layer_types_of,
    layer_window,
    module_rope,
    sliding_window_of,
)
from kvtier.layout import KVLayout
from kvtier.reference.hga import RouteCarry
from kvtier.rope import RopeSpec, rope_spec_of

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

_MARK = "_kvtier_layer"  # attribute TieredLayer.update puts on the K it returns
_SETTINGS = "_kvtier_settings"  # attribute configure() puts on each attention module


# --------------------------------------------------------------------------- model config


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


# --------------------------------------------------------------------------- tiered cache


class TieredLayer(DynamicLayer):
    """One layer of a :class:`TieredCache` (created by it; not meant to be built directly).

    Holds the new tokens' K/V between ``update`` and the ``"hga"`` attention call that
    follows; everything else (summaries, windows, group cache, slot tables) lives in the
    cache's :class:`kvtier.engine.HGAEngine`.
    """

    def __init__(self, cache: TieredCache, layer_idx: int) -> None:
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self._clear()

    def _clear(self) -> None:
        self.num_tokens = 0
        self.batch_size: int | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- transformers Cache layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = self.values = None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the new tokens' K/V; the ``"hga"`` attention call that follows attends them.

        Returns the new K/V themselves (not the whole context), marked so that the attention
        function finds this layer.
        """
        if self._pending is not None:
            raise RuntimeError(
                f"TieredCache layer {self.layer_idx}: expected the 'hga' attention to consume each update, "
                "got two updates in a row; load the model with attn_implementation='hga'"
            )
        self._cache._check_kv(key_states, value_states, self)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        marked = key_states.view(key_states.shape)
        setattr(marked, _MARK, self)
        return marked, value_states

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.num_tokens + (self._pending[0].shape[2] if self._pending is not None else 0)

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else kwargs.get("query_length", 0)
        if isinstance(query_length, torch.Tensor):
            query_length = int(query_length.shape[0])
        return self.get_seq_length() + int(query_length), 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TieredCache: cropping is not supported (closed chunks are immutable)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError(f"TieredCache: expected one sequence per prompt, got repeats={repeats}")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("TieredCache: selecting batch rows is not supported")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("TieredCache: beam search is not supported")

    def attend(
        self, q: torch.Tensor, scale: float, *, keep: torch.Tensor | None = None, position_ids: Any = None,
        sinks: torch.Tensor | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        """HGA for the pending tokens' queries ``q [B, Hq, Lq, D]``; returns ``[B, Hq, Lq, D]``.

        ``keep [B, Lk]`` (bool, ``Lk`` = every token so far, padding included) marks the real
        tokens of a padded batch, None when there is no padding; ``position_ids`` are the
        model's, checked to be each row's ranks among its real tokens; ``sinks [Hq]`` and
        ``softcap`` as the model passes them (gpt-oss, Gemma-2).
        """
        if self._pending is None:
            raise RuntimeError(f"TieredCache layer {self.layer_idx}: expected an update before attention, got none")
        k, v = self._pending
        self._pending = None
        out = self._cache._attend(self, q, k, v, scale, keep, position_ids, dict(sinks=sinks, softcap=softcap))
        self.num_tokens += k.shape[2]
        return out


#: Engine counters TieredCache.stats() also shows at its top level (what a benchmark reads).
_FLAT_STATS = (
    "cache_hits", "cache_misses", "device_cache_hit_rate", "host_bytes_gathered", "disk_waits", "disk_wait_s",
    "prefetch_issued", "prefetch_hits", "prefetch_hit_share", "host_syncs", "cuda_graphs", "decode_steps",
)  # fmt: skip


class TieredCache(Cache):
    """A transformers ``Cache`` whose K/V lives in a :class:`kvtier.TieredStore`, attended by HGA.

    A thin adapter over :class:`kvtier.engine.HGAEngine`: the compute device keeps the chunk
    and group summaries, the sink chunks, the local window and the open chunk of every layer
    (and, on CUDA, a group cache); every closed chunk goes to the store's host tier, which
    spills to a disk tier under ``store.disk_dir`` when ``host_bytes`` is exceeded.

    Parameters
    ----------
    model_config : transformers.PretrainedConfig, or the model itself
        The model's config: full-attention and sliding-window layers, GQA, RoPE with fixed frequencies
        (:func:`kvtier.rope_spec_of`: default, linear, llama3, yarn, partial or interleaved dims,
        and longrope / dynamic NTK while a sequence stays in one regime).
    hga : HGAConfig, optional
        Budgets and windows; the paper's defaults when omitted.
    store : StoreConfig, optional
        Budgets and disk folder of the store; ``StoreConfig()`` when omitted (no disk tier).
        ``gpu_bytes`` is the budget of the engine's device group cache (the store itself
        gets no device tier: the engine caches groups, not chunks).
    prefetch : bool
        Promote the router's fetch set (the routed chunks and the next best,
        ``HGAConfig.fetch_groups``) from disk to the host tier on the store's I/O threads
        while other layers compute. Default True.

    Raises
    ------
    ConfigError
        If the model's RoPE is not served (:func:`kvtier.rope_spec_of`), every layer is sliding
        (nothing for HGA), or a KV head count does not divide the query heads; at a call, if a
        longrope or dynamic-NTK sequence leaves the RoPE regime it started in (longrope's switch
        at ``original_max_position_embeddings``, dynamic NTK past ``max_position_embeddings``).

    Notes
    -----
    Sliding-window layers (Gemma-3, Cohere2, Gemma-2, gpt-oss) get transformers' own
    ``DynamicSlidingWindowLayer`` (their window of K/V on the compute device) and exact
    windowed attention; HGA and the store serve the full-attention layers.

    longrope (Phi-3, Phi-4-mini) uses the short factors for a context up to
    ``original_max_position_embeddings`` and the long ones beyond, per call (transformers'
    ``dynamic_rope_update``: the largest position of the call decides). A sequence that starts
    past the switch is served with the long factors throughout, one that stays below it with
    the short ones; a call that crosses it raises ConfigError (the stored chunks hold keys
    rotated with the short factors). Phi-3's ``generate`` drops any cache at the step that
    reaches the switch with the cache at or below it (for a longer prompt, at the first step)
    and continues with transformers' DynamicCache: prefill the TieredCache with
    ``model(prompt[:, :-1], cache=cache)`` before ``generate(prompt, cache=cache)``.

    Attention sinks (gpt-oss) and logit soft-capping (Gemma-2), read from the config
    (:func:`logit_features_of`) or passed by the model at the first call, are applied in the
    engine's exact attention; the kernels have neither, so such a model's engine runs its
    torch flow (``backend="torch"``), on CUDA too, slower than the kernels.

    Only models loaded with ``attn_implementation="hga"`` can use it: ``update`` returns
    the new tokens' K/V only. The store and the engine are created at the first attention
    call (when dtype, device, batch and the attention mask are known) and closed by
    :meth:`close` (or ``with TieredCache(...) as cache``). Sequence b's chunks are stored
    under seq_id b.

    Batches: rows of equal length (no padding in the first call's attention mask) share one
    batched engine. A padded batch (left or right, the mask a tokenizer and ``generate``
    make) is served row by row (:class:`kvtier.rows.RowEngines`): one engine of batch 1 per
    row over the one store, each given only its row's real tokens, so padding is never
    attended, routed or summarised and a row gives what it gives alone; it costs B engine
    calls per full-attention layer and step instead of one. The real tokens must sit at
    ``position_ids`` equal to their rank in the row (what ``generate`` passes for left
    padding); padding that appears after an unpadded start raises ``ValueError``.
    """

    def __init__(
        self, model_config: Any, hga: HGAConfig | None = None, store: StoreConfig | None = None, *, prefetch: bool = True
    ) -> None:
        hga = HGAConfig() if hga is None else hga
        store = StoreConfig() if store is None else store
        if not isinstance(hga, HGAConfig):
            raise TypeError(f"hga: expected an HGAConfig, got {type(hga).__name__}")
        if not isinstance(store, StoreConfig):
            raise TypeError(f"store: expected a StoreConfig, got {type(store).__name__}")
        self.hga = hga
        self.store_config = store
        geometry = _model_geometry(model_config, allow_sliding=True)
        self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim = geometry
        self._rope_source = getattr(model_config, "config", model_config)
        #: The model's RoPE on its full-attention layers (:func:`kvtier.rope_spec_of`), what the engine's
        #: summaries rotate by. longrope and dynamic NTK hold for a range of context lengths
        #: (``rope.min_seq_len .. rope.max_seq_len``): picked again at the first attention call from its
        #: length; a later call outside that range raises ConfigError.
        self.rope = rope_spec_of(self._rope_source)
        #: Per layer, "full_attention" (HGA over the store) or "sliding_attention" (transformers'
        #: own sliding-window layer: its window of K/V on the compute device, exact attention).
        self.layer_types = layer_types_of(model_config)
        window = sliding_window_of(model_config)
        self.store: Any = None
        #: kvtier.engine.HGAEngine (a batch without padding) or kvtier.rows.RowEngines (a padded
        #: batch, one engine per row); None until the first attention call.
        self.engine: Any = None
        self._kv: tuple[torch.dtype, int] | None = None  # dtype and batch of the first update
        self._first_full = self.layer_types.index("full_attention")
        #: Attention sinks / logit soft-capping of the model (:func:`logit_features_of`): served
        #: by the engine's torch flow (on CUDA too: the kernels have neither).
        self.logit_features = logit_features_of(model_config)
        #: Promote the router's fetch set from disk on the store's I/O threads.
        self.prefetch = prefetch
        layers = [
            TieredLayer(self, i) if t == "full_attention" else DynamicSlidingWindowLayer(sliding_window=window)
            for i, t in enumerate(self.layer_types)
        ]
        super().__init__(layers=layers)

    # -- called by the layers
    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, layer: TieredLayer) -> None:
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError(f"key/value states: expected tensors, got {type(k).__name__}, {type(v).__name__}")
        want = (self.num_kv_heads, self.head_dim)
        if k.dim() != 4 or (k.shape[1], k.shape[3]) != want or v.shape != k.shape:
            raise ValueError(
                f"key/value states: expected [B, {want[0]}, L, {want[1]}] each, got {list(k.shape)} and {list(v.shape)}"
            )
        if layer.batch_size is None:
            layer.batch_size = k.shape[0]
        elif layer.batch_size != k.shape[0]:
            raise ValueError(f"key states: expected batch {layer.batch_size} as before, got {k.shape[0]}")
        if self._kv is None:  # the engine opens at the first attention call, which brings the mask
            self._kv = (k.dtype, k.shape[0])
        elif k.dtype != self._kv[0]:
            raise TypeError(f"key states: expected dtype {self._kv[0]} as before, got {k.dtype}")
        elif k.shape[0] != self._kv[1]:
            raise ValueError(f"key states: expected batch {self._kv[1]} as before, got {k.shape[0]}")

    def _attend(
        self, layer: TieredLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        keep: torch.Tensor | None, position_ids: Any, logits: dict[str, Any],
    ) -> torch.Tensor:
        """One full-attention layer's new tokens through the engine (batched) or the row engines (padded)."""
        from kvtier.rows import RowEngines

        b, lq = k.shape[0], k.shape[2]
        start = layer.num_tokens
        if keep is not None and keep.shape != (b, start + lq):
            raise ValueError(f"attention_mask: expected key padding [{b}, {start + lq}], got {list(keep.shape)}")
        if self.engine is None:
            extra = any(x is not None for x in logits.values())  # sinks / soft-capping the config did not name
            first_len = start + lq if keep is None else int(keep.sum(dim=1).max())  # max position + 1, as the model
            self._open(k.dtype, k.device, b, padded=keep is not None, torch_flow=extra, seq_len=first_len)
        if not isinstance(self.engine, RowEngines):
            if keep is not None:
                raise ValueError(
                    f"attention_mask: TieredCache expected no padding after {start} tokens of a batch that started "
                    "without padding (its rows share one engine that advances them together), got padding; pass "
                    "the padded attention_mask from the first call, or reset() the cache"
                )
            # One check per forward (every layer sees the same positions), on multi-token calls only: the
            # comparison reads the positions back, and a decode step must not wait for the device.
            if layer.layer_idx == self._first_full and lq > 1:
                everyone = torch.arange(lq, device=k.device)
                for r in range(b):
                    check_row_positions(position_ids, r, everyone, start)
            self._check_rope(start + lq)
            return self.engine.forward(layer.layer_idx, q, k, v, scale=scale, **logits)
        real: list[torch.Tensor | None] = []
        longest = 0
        past = None if keep is None else keep[:, :start].sum(dim=1).tolist()  # real tokens before this call
        for r in range(b):
            held = self.engine.num_tokens(layer.layer_idx, r)
            if past is not None and past[r] != held:
                raise ValueError(
                    f"attention_mask: expected row {r}'s earlier keys to hold {held} real tokens (what the cache "
                    f"holds), got {past[r]}"
                )
            idx = None if keep is None else keep[r, start:].nonzero().squeeze(1)
            if idx is not None and idx.numel() == lq:
                idx = None
            check_row_positions(position_ids, r, torch.arange(lq, device=k.device) if idx is None else idx, held)
            real.append(idx)
            longest = max(longest, held + (lq if idx is None else int(idx.numel())))
        self._check_rope(longest)
        return self.engine.forward(layer.layer_idx, q, k, v, real, scale=scale, **logits)

    def _check_rope(self, seq_len: int) -> None:
        """A call reaching ``seq_len`` tokens (max position + 1) must keep the RoPE the sequence started with."""
        spec = self.rope
        try:
            spec.check_context(seq_len)
        except ConfigError:
            hi = "any" if spec.max_seq_len is None else spec.max_seq_len
            raise ConfigError(
                f"rope_type {spec.rope_type!r}: TieredCache expected every call of a sequence to stay within the RoPE "
                f"frequencies it started with ({spec.min_seq_len} to {hi} tokens), got a call reaching {seq_len} "
                "tokens, where the model rotates by other frequencies while the stored chunks keep their keys; "
                "start the sequence past the switch (longrope: a first call longer than "
                "original_max_position_embeddings) or run it without a TieredCache"
            ) from None

    def _open(
        self, dtype: torch.dtype, device: torch.device, batch_size: int, *, padded: bool, torch_flow: bool = False,
        seq_len: int,
    ) -> None:
        from dataclasses import replace

        from kvtier.engine import HGAEngine
        from kvtier.rows import RowEngines
        from kvtier.store import TieredStore

        layout = KVLayout(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            dtype=dtype, chunk_size=self.hga.chunk_size, group_size=self.hga.group_size,
        )
        config = self.store_config
        # longrope / dynamic NTK: the frequencies the model uses at this first call's length (longrope's long
        # factors when it starts past original_max_position_embeddings); later calls must stay in that regime.
        self.rope = rope_spec_of(self._rope_source, seq_len=seq_len)
        # The store's tensors are made outside inference mode: its I/O threads write them.
        with torch.inference_mode(False):
            if self.store is None:
                self.store = TieredStore(layout, replace(config, gpu_bytes=0, device=str(device)))
                # A disk folder may hold chunks of an earlier run with the same layout: never serve them.
                for seq_id in sorted({key.seq_id for key in self.store.keys()}):
                    self.store.drop(seq_id)
            # The kernels have no sink logits or soft-capping: such a model runs the engine's torch flow.
            backend = "torch" if torch_flow or self.logit_features else "auto"
            common = dict(
                hga=self.hga, num_q_heads=self.num_q_heads, rope=self.rope, device=device, prefetch=self.prefetch,
                backend=backend,
            )
            if padded:  # rows of different real lengths: one engine of batch 1 per row (kvtier.rows)
                self.engine = RowEngines(self.store, batch_size=batch_size, cache_bytes=int(config.gpu_bytes), **common)
            else:
                self.engine = HGAEngine(self.store, batch_size=batch_size, cache_bytes=int(config.gpu_bytes), **common)

    @property
    def store_device(self) -> torch.device:
        """Device the attention runs on (the first layer's K/V device)."""
        return self.engine.device if self.engine is not None else torch.device("cpu")

    # -- public
    def reset(self) -> None:
        """Forget every sequence (store contents included); the cache can be reused."""
        if self.engine is not None:
            self.engine.reset()
            self.engine.close()
            self.engine = None
        self._kv = None
        if self.store is not None:
            for seq_id in sorted({key.seq_id for key in self.store.keys()}):
                self.store.drop(seq_id)
        for layer in self.layers:
            layer.reset()

    def stats(self) -> dict[str, Any]:
        """Tokens, keys per query, density, what the engine moved, and the store's counters.

        Returns
        -------
        dict
            ``tokens``, ``closed_chunks`` (per layer, the first full-attention layer), ``mean_keys_per_query``,
            ``density``, ``device_resident_bytes`` (engine state on the compute device),
            ``reads_by_tier`` (routed groups served per step by the device group cache, the
            host slab, and chunks read from disk for a waiting step), ``engine``
            (:meth:`kvtier.engine.HGAEngine.stats`: bytes gathered, cache hit rate, disk
            waits, prefetch hit share, host syncs, ``cuda_graphs``; the benchmark's counters
            also at the top level: ``cache_hits``, ``cache_misses``, ``device_cache_hit_rate``,
            ``host_bytes_gathered``, ``disk_waits``, ``disk_wait_s``, ``prefetch_issued``,
            ``prefetch_hits``, ``prefetch_needed``, ``prefetch_hit_share``, ``host_syncs``,
            ``cuda_graphs``, ``decode_steps``) and ``store``
            (:meth:`kvtier.TieredStore.stats`, or None).
        """
        eng = self.engine.stats() if self.engine is not None else None
        reads = {"device": 0, "host": 0, "disk": 0}
        if eng is not None:
            rate = eng["device_cache_hit_rate"]
            gathered = eng["groups_gathered"]
            if rate is not None and rate < 1.0:
                reads["device"] = round(gathered * rate / (1.0 - rate))
            reads["host"] = gathered
            reads["disk"] = eng["disk_waits"]
        return {
            "tokens": self.get_seq_length(),
            "closed_chunks": eng["closed_chunks"] if eng else 0,
            "mean_keys_per_query": eng["mean_keys_per_query"] if eng else 0.0,
            "density": eng["density"] if eng else 0.0,
            "device_resident_bytes": eng["device_resident_bytes"] if eng else 0,
            "reads_by_tier": reads,
            **{key: eng[key] for key in _FLAT_STATS if eng is not None},
            "prefetch_needed": (eng["prefetch_hits"] + eng["disk_waits"]) if eng else 0,
            "engine": eng,
            "store": None if self.store is None else self.store.stats(),
        }

    def close(self) -> None:
        """Close the store (its disk files stay in ``disk_dir``, which the caller owns)."""
        if self.engine is not None:
            self.engine.close()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- attention function


def _full_context_hga(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: HGAConfig, rope: RopeSpec, start: int,
    carry: RouteCarry | None = None, *, sinks: torch.Tensor | None = None, softcap: float | None = None,
    backend: str = "auto",
):
    """HGA over the full K/V: the kernels on CUDA where they serve ``cfg``, the reference otherwise
    and for sinks / soft-capping (the kernels have neither: on CUDA such a layer runs the
    reference's torch ops, slower)."""
    from kvtier.attention import KERNEL_CHUNK_SCORES, hga_attention

    if backend == "auto" and (sinks is not None or softcap is not None):
        backend = "reference"
    if backend == "auto" and cfg.chunk_score not in KERNEL_CHUNK_SCORES:
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
