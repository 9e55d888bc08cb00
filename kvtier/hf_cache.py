"""TieredCache: the transformers ``Cache`` of :mod:`kvtier.hf`, a thin adapter over the engine.

:mod:`kvtier.hf` re-exports :class:`TieredCache`; its ``"hga"`` attention function finds the
:class:`TieredLayer` of a call by the mark ``update`` puts on the K it returns.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvtier.config import HGAConfig, StoreConfig
from kvtier.errors import ConfigError
from kvtier.hf_config import _model_geometry, logit_features_of
from kvtier.hf_layers import check_row_positions, layer_types_of, sliding_window_of
from kvtier.layout import KVLayout
from kvtier.rope import rope_spec_of

__all__ = ["TieredCache", "TieredLayer"]

_MARK = "_kvtier_layer"  # attribute TieredLayer.update puts on the K it returns


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
