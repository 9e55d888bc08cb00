"""The HGA engine: per model, the state HGA keeps beside a :class:`kvtier.TieredStore`, and one step per layer.

Per layer and batch row the engine owns, on the compute device:

* float32 chunk summaries ``[B, Hkv, N, D]`` and group summaries ``[B, Hkv, N, M, D]`` of the
  N closed chunks (grown by doubling);
* a ring of ``hot = sink_chunks + local_chunks + 1`` chunk slots per row holding the sink
  chunks, the local window and the open chunk, the first ``B * hot`` slots of a device slab
  ``[slots, 2, Hkv, C, D]`` (``slot_map [B, N]`` says which slot holds a window chunk);
* with the kernels, the rest of that slab is the device group cache: E entries per
  (row, KV head), looked up and filled by ``assign_groups`` / ``gather_groups``;
* a slot table ``[B, N]`` int32 mapping (row, chunk) of this layer to the store's host slab
  slot (-1: not in the host tier), kept current by the store's host-slot callback on every
  write, spill, eviction, promotion and drop, so a step never asks the store where a chunk is.

One call, :meth:`HGAEngine.forward`, takes one layer's new post-RoPE K/V and the queries of
the same tokens and returns the attention output; prefill pieces and decode tokens go through
it alike, split into blocks of positions that share a chunk, each position routed on its own
(as the reference, :mod:`kvtier.reference.hga`). A block: route -> make the routed groups
resident (host slab by slot; only chunks that are on disk alone are waited for, with one
batched store call) -> attend over windows + routed groups + the causal own chunk. A chunk
that fills is summarised and written to the store (``seq_id`` = ``first_seq_id`` + batch row).

Two flows over the same state:

* ``"torch"`` (CPU): routing by :func:`kvtier.reference.route_block`; per (row, KV head) the
  union of the groups its query heads and positions chose is gathered from the host slab by
  slot-table indexing, once; softmax attention in float32 over ring keys + those groups, each
  query masked to its own choice; attention sinks (gpt-oss) and logit soft-capping (Gemma-2)
  when :meth:`HGAEngine.forward` is given them (the kernel flow has neither).
* ``"kernels"`` (CUDA, or the Triton interpreter): decode by :class:`LayerDecode`
  (``route_chunks`` + ``route_groups`` -> ``assign_groups`` -> ``gather_groups`` from the
  pinned host slab -> ``sparse_decode``) over preallocated buffers, no host sync and no
  allocation while every chunk is host-resident; prefill blocks by the routing kernels, the
  block's union gathered into a scratch slab and ``sparse_prefill``.

Batches are sequences of equal length (the engine carries one length per layer); a padded
batch runs one engine of batch 1 per row over the same store (:mod:`kvtier.rows`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from kvtier.config import HGAConfig
from kvtier.decode_step import LayerDecode
from kvtier.engine_residency import _Residency, _TooManyChunks
from kvtier.engine_state import _Counters, _Layer, _normal_tensors
from kvtier.engine_torch import _TorchFlow
from kvtier.engine_unions import _BIG, _union
from kvtier.layout import window_keys
from kvtier.reference.hga import check_logit_options, plan_widths
from kvtier.reference.rope import rope_inv_freq
from kvtier.reference.summaries import routing_summaries_ref
from kvtier.store import TieredStore

__all__ = ["BACKENDS", "HGAEngine", "engine_from_dense"]

#: Accepted values of ``backend``.
BACKENDS = ("auto", "torch", "kernels")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Device group cache when no budget is given (engine_from_dense, direct use): 4 GiB.
_MAX_CACHE_BYTES = 4 << 30


def _resolved(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: tensors always carry an index, so compare against one."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _fixed_keys(positions: torch.Tensor, config: HGAConfig) -> torch.Tensor:
    """Keys of the windows and the causal current chunk of each position ``[Lq]``."""
    return window_keys(positions, config.chunk_size, config.sink_chunks, config.local_chunks)


class HGAEngine(_Residency, _TorchFlow):
    """HGA over a :class:`kvtier.TieredStore`: summaries, windows, group cache and slot tables per layer.

    Parameters
    ----------
    store : TieredStore
        Holds every closed chunk; its layout gives layers, Hkv, D, dtype, C and G. The engine
        registers itself as the store's host-slot watcher (one engine per store).
    hga : HGAConfig, optional
        Budgets and windows; ``chunk_size`` and ``group_size`` must match the store's layout.
    num_q_heads : int
        Hq, a multiple of the layout's Hkv.
    batch_size : int
        B; row b's chunks are stored under ``seq_id = first_seq_id + b``.
    rope_theta : float, optional
        RoPE base of plain RoPE, for the summaries.
    rope : kvtier.rope.RopeSpec, optional
        The model's own RoPE frequencies (instead of ``rope_theta``).
    device : torch.device or str
        Compute device of q, k, v and of the engine's state.
    backend : {"auto", "torch", "kernels"}
        "auto": the kernels on CUDA, torch ops otherwise. "kernels" on the CPU needs
        ``TRITON_INTERPRET=1``.
    cache_bytes : int, optional
        Budget of the device group cache over all layers (kernels); sets E, the entries per
        (row, KV head, layer), rounded down to a power of two but never below one step's
        fetch set (``Hq / Hkv * fetch width``).
    cache_entries : int, optional
        E itself (a power of two), overriding ``cache_bytes``.
    prefetch : bool
        Promote the router's fetch set (``fetch_group_ids``) from disk to the host tier on the
        store's I/O threads when some of it is on disk only. Default True.
    first_seq_id : int
        Store ``seq_id`` of row 0 (default 0). Several engines can share one store when their
        ranges ``first_seq_id .. first_seq_id + B - 1`` do not overlap (TieredCache serves a
        padded batch with one engine of batch 1 per row).

    Notes
    -----
    What synchronises with the host, and why (CUDA):

    * a chunk closing (every C tokens per layer): ``store.write`` copies it to the host tier;
      if that evicts a host slot, the store waits (fence) for the gathers queued before;
    * a block whose layer has chunks on disk only, or prefetches in flight: the routed chunk
      ids are read back to know which chunks to wait for and to prefetch;
    * a prefill block: the size of its routed-group union is read back to size the tables.

    A decode step over host-resident chunks reads nothing back.
    """

    def __init__(
        self,
        store: TieredStore,
        hga: HGAConfig | None = None,
        *,
        num_q_heads: int,
        batch_size: int,
        rope_theta: float | None = None,
        rope: Any = None,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        cache_bytes: int | None = None,
        cache_entries: int | None = None,
        prefetch: bool = True,
        first_seq_id: int = 0,
        _device_table: bool | None = None,
    ) -> None:
        if not isinstance(store, TieredStore):
            raise TypeError(f"store: expected a TieredStore, got {type(store).__name__}")
        hga = HGAConfig() if hga is None else hga
        if not isinstance(hga, HGAConfig):
            raise TypeError(f"hga: expected an HGAConfig, got {type(hga).__name__}")
        lay = store.layout
        if (hga.chunk_size, hga.group_size) != (lay.chunk_size, lay.group_size):
            raise ValueError(
                f"hga: expected chunk_size, group_size = {lay.chunk_size}, {lay.group_size} like the store's "
                f"layout, got {hga.chunk_size}, {hga.group_size}"
            )
        if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads % lay.num_kv_heads:
            raise ValueError(f"num_q_heads: expected a multiple of Hkv={lay.num_kv_heads}, got {num_q_heads!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if isinstance(first_seq_id, bool) or not isinstance(first_seq_id, int) or first_seq_id < 0:
            raise ValueError(f"first_seq_id: expected an int >= 0, got {first_seq_id!r}")
        self.device = _resolved(torch.device(device))
        from kvtier.attention import kernel_refusal, kernels_route

        scored = kernels_route(hga)
        # The kernel path keeps one step's fetch set in the device group cache. A config whose
        # fetch set has no useful bound (HGAConfig.full_coverage()) or exceeds the budget cannot.
        m_ = hga.groups_per_chunk
        e_min = 1 << max(0, (max(m_, num_q_heads // lay.num_kv_heads * min(hga.fetch_groups, hga.top_chunks * m_)) - 1).bit_length())
        per_entry = lay.num_layers * batch_size * lay.num_kv_heads * lay.group_bytes
        budget = int(cache_bytes) if cache_bytes is not None else _MAX_CACHE_BYTES
        cache_fits = cache_entries is not None or e_min * per_entry <= budget
        if backend == "auto":
            backend = "kernels" if self.device.type == "cuda" and scored and cache_fits else "torch"
        if backend == "kernels" and not cache_fits:
            raise ValueError(
                f"cache_bytes: expected room for one step's fetch set ({e_min} entries x {per_entry} bytes) for "
                f"backend='kernels', got {budget} bytes; raise it, lower fetch_groups/top_chunks, or use backend='torch'"
            )
        if backend == "kernels" and not scored:
            raise ValueError(f"backend='kernels': {kernel_refusal(hga)} (what the routing kernels compute); use backend='torch'")
        if backend == "kernels" and self.device.type != "cuda" and not _interpreting():
            raise ValueError(f"backend='kernels': expected a CUDA device (or TRITON_INTERPRET=1), got {self.device}")
        self.backend = backend
        self.store = store
        self.hga = hga
        self.layout = lay
        self.num_layers = lay.num_layers
        self.num_q_heads = num_q_heads
        self.num_kv_heads = lay.num_kv_heads
        self.head_dim = lay.head_dim
        self.batch_size = batch_size
        #: Store seq_id of row 0: row b's chunks are under ``first_seq_id + b``.
        self.first_seq_id = first_seq_id
        self.rep = num_q_heads // lay.num_kv_heads
        self.prefetch = prefetch
        # A device copy of the slot tables, updated from the store's callbacks at each block
        # (CUDA); on the CPU the kernels read the callback-maintained table itself. Tests set
        # it on the CPU to run the CUDA bookkeeping under the interpreter.
        self._device_table = self.device.type != "cpu" if _device_table is None else _device_table
        if (rope is None) == (rope_theta is None):
            raise ValueError("rope_theta, rope: expected exactly one of them, got " + ("both" if rope is not None else "neither"))
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        m = hga.groups_per_chunk
        self.hot = hga.sink_chunks + hga.local_chunks + 1
        self.group_key_dim = hga.group_key_dim(lay.head_dim)
        # What the summaries rotate by: the model's RopeSpec, or plain RoPE's frequencies.
        self._inv_freq = rope if rope is not None else rope_inv_freq(lay.head_dim, self.rope_theta, device=self.device)
        if cache_entries is None:
            e = e_min
            if cache_bytes is not None and backend == "kernels":
                fit = max(1, int(cache_bytes) // per_entry)
                e = max(e_min, 1 << (fit.bit_length() - 1))
        else:
            e = int(cache_entries)
            if e & (e - 1) or e < e_min:
                raise ValueError(f"cache_entries: expected a power of two >= {e_min}, got {cache_entries}")
        self.cache_entries = e if backend == "kernels" else 0
        self.counters = _Counters()
        self._layers = [_Layer(i) for i in range(self.num_layers)]
        # The lowest layer holding tokens: its steps count as decode steps and stats() reports its
        # tokens (a hybrid model's sliding layers never reach the engine, so layer 0 may stay empty).
        self._lead: int | None = None
        with _normal_tensors():
            self._keys_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            self._density_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            self._gathered = torch.zeros((), dtype=torch.int64, device=self.device)  # groups host -> device
            self._cache_used = torch.zeros((), dtype=torch.int64, device=self.device)  # distinct groups asked
            self._gather_event = torch.cuda.Event() if self.device.type == "cuda" else None
        self._slot_changes = 0
        self._inflight: list[Any] = []  # PrefetchHandles of the fetch-set prefetches not known to be done
        self._keys_fixed = 0  # window keys of single-position blocks, counted in Python
        self._density_fixed = 0.0
        #: Attended group ids ``[B, Hq, Lb, Kg]`` of the last block (a view of the step's buffer: clone to keep).
        self.last_group_ids: torch.Tensor | None = None
        store.watch_host_slots(self._on_host_slot)
        if self._gather_event is not None:
            store.add_host_fence(self._fence)

    # ------------------------------------------------------------------ state
    def _ring_slot(self, chunk: int) -> int:
        sink = self.hga.sink_chunks
        return chunk if chunk < sink else sink + (chunk - sink) % (self.hga.local_chunks + 1)

    def _init_layer(self, st: _Layer, dtype: torch.dtype) -> None:
        b, hkv, d = self.batch_size, self.num_kv_heads, self.head_dim
        c, m = self.hga.chunk_size, self.hga.groups_per_chunk
        cache_slots = -(-b * self.cache_entries // m) if self.backend == "kernels" else 0
        with _normal_tensors():
            st.slab = torch.zeros(b * self.hot + cache_slots, 2, hkv, c, d, dtype=dtype, device=self.device)
            st._ring = st.slab[: b * self.hot].view(b, self.hot, 2, hkv, c, d)
            if self.backend == "kernels":
                e = self.cache_entries
                i32 = dict(dtype=torch.int32, device=self.device)
                st.tags = torch.full((b, hkv, e), -1, **i32)
                st.stamp = torch.full((b, hkv, e), -1, **i32)
                st.counter = torch.zeros(b, hkv, **i32)
                st.where = torch.full((b, hkv, 0), -1, **i32)
        st.ring_chunk = [-1] * self.hot
        self._grow(st, 16)
        self._lead = st.index if self._lead is None else min(self._lead, st.index)

    def _grow(self, st: _Layer, need: int) -> None:
        """Make room for ``need`` chunks in every per-chunk tensor (doubling)."""
        if need <= st.cap:
            return
        cap = max(need, 2 * st.cap, 16)
        b, hkv, d, m = self.batch_size, self.num_kv_heads, self.head_dim, self.hga.groups_per_chunk
        n = st.cap
        with _normal_tensors(), self.store.host_lock():
            cs = torch.zeros(b, hkv, cap, d, dtype=torch.float32, device=self.device)
            gs = torch.zeros(b, hkv, cap, m, self.group_key_dim, dtype=torch.float32, device=self.device)
            slot_map = torch.zeros(b, cap, dtype=torch.int32, device=self.device)
            host_np = np.full((b, cap), -1, dtype=np.int32)
            if n:
                cs[:, :, :n] = st.cs
                gs[:, :, :n] = st.gs
                slot_map[:, :n] = st.slot_map
                host_np[:, :n] = st.host_np
            st.cs, st.gs, st.slot_map, st.host_np = cs, gs, slot_map, host_np
            st.host_cpu = torch.from_numpy(host_np)
            if self._device_table:
                st.host_dev = st.host_cpu.to(self.device, copy=True)
                st.dirty.clear()
            if st.where is not None:
                where = torch.full((b, hkv, cap * m), -1, dtype=torch.int32, device=self.device)
                where[:, :, : n * m] = st.where
                st.where = where
            from kvtier.attention import num_running_terms

            r = num_running_terms(self.hga)
            if self.backend == "kernels" and r:
                # -inf: no query has scored a chunk yet (a step inside a chunk after load_dense).
                running = torch.full((r, b, self.num_q_heads, cap), float("-inf"), device=self.device)
                if st.running is not None:
                    running[..., :n] = st.running
                st.running = running
            st.cap = cap
            st.decode = None  # its buffers view the old tensors

    def _open_chunk(self, st: _Layer, chunk: int) -> None:
        self._grow(st, chunk + 1)
        slot = self._ring_slot(chunk)
        st.ring_chunk[slot] = chunk
        assert st.slot_map is not None
        rows = torch.arange(self.batch_size, dtype=torch.int32, device=self.device) * self.hot + slot
        st.slot_map[:, chunk] = rows

    def _close_chunk(self, st: _Layer, chunk: int, summaries: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Chunk ``chunk`` is full: summarise it, write it to the store (it stays in the ring)."""
        cfg = self.hga
        c = cfg.chunk_size
        slot = self._ring_slot(chunk)
        assert st.cs is not None and st.gs is not None
        if summaries is None:
            k = st.ring[:, slot, 0]  # [B, Hkv, C, D]
            cs, gs = routing_summaries_ref(k, cfg, self._inv_freq, start=chunk * c)
            st.cs[:, :, chunk] = cs[:, :, 0]
            st.gs[:, :, chunk] = gs[:, :, 0]
        else:
            st.cs[:, :, chunk] = summaries[0][:, :, chunk]
            st.gs[:, :, chunk] = summaries[1][:, :, chunk]
        with self.store.host_lock():
            st.missing.update((b, chunk) for b in range(self.batch_size))
            st.num_closed = chunk + 1
        for b in range(self.batch_size):
            self.store.write((self.first_seq_id + b, st.index, chunk), st.ring[b, slot])

    # ------------------------------------------------------------------ public
    def num_tokens(self, layer: int = 0) -> int:
        """Tokens the engine holds for ``layer`` (every row has as many)."""
        return self._layers[layer].num_tokens

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        sinks: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Append one layer's new tokens and attend their queries.

        Parameters
        ----------
        layer : int
            Layer index, ``0 <= layer < num_layers``.
        q : Tensor ``[B, Hq, L, D]``
            Post-RoPE queries of the new tokens (positions ``num_tokens(layer) ..``), last dim
            contiguous, dtype of the store's layout, on the engine's device.
        k, v : Tensor ``[B, Hkv, L, D]``
            Post-RoPE keys and values of the same tokens.
        scale : float, optional
            Softmax scale, ``D ** -0.5`` when omitted.
        sinks : Tensor ``[Hq]``, optional
            Per-head sink logits (gpt-oss): one more softmax entry per query, carrying no value
            (torch flow only). Routing is unaffected.
        softcap : float, optional
            Logit soft-capping ``softcap * tanh(logit / softcap)`` of the scaled logits
            (Gemma-2; torch flow only). Routing is unaffected.

        Returns
        -------
        Tensor ``[B, Hq, L, D]`` in ``q.dtype``: HGA over every token so far, per position.

        Raises
        ------
        TypeError, ValueError
            On a wrong shape, dtype or device; sinks or soft-capping with the kernel flow.
        TransferError
            If a routed chunk is no longer in the store (lost), or a disk read failed.
        CapacityError
            If the host tier cannot hold one block's routed chunks at once.
        """
        self._check(layer, q, k, v)
        check_logit_options(sinks, softcap, q)
        if self.backend == "kernels" and (sinks is not None or softcap is not None):
            raise ValueError(
                "sinks, softcap: expected neither with backend 'kernels' (the kernels have no sink logits or "
                "soft-capping), got " + ("sinks" if sinks is not None else f"softcap={softcap!r}")
                + "; build the engine with backend='torch'"
            )
        d = self.head_dim
        scale = d**-0.5 if scale is None else float(scale)
        if self.backend == "kernels" and not math.isclose(scale, d**-0.5, rel_tol=1e-6):
            # The kernels scale by D ** -0.5: fold the rest into q (a positive factor leaves
            # every routing choice as it is).
            q = (q * (scale * d**0.5)).to(q.dtype)
        st = self._layers[layer]
        if st.slab is None:
            self._init_layer(st, k.dtype)
        c = self.hga.chunk_size
        start, length = st.num_tokens, k.shape[2]
        out = torch.empty_like(q)
        pos = start
        while pos < start + length:
            cur = pos // c
            end = min(start + length - 1, cur * c + c - 1)
            rows = slice(pos - start, end - start + 1)
            if pos % c == 0 or st.ring_chunk[self._ring_slot(cur)] != cur:
                self._open_chunk(st, cur)
            slot = self._ring_slot(cur)
            st.ring[:, slot, 0, :, pos - cur * c : end - cur * c + 1] = k[:, :, rows]
            st.ring[:, slot, 1, :, pos - cur * c : end - cur * c + 1] = v[:, :, rows]
            st.num_tokens = end + 1
            out[:, :, rows] = self._attend(st, q[:, :, rows], pos, end, scale, sinks=sinks, softcap=softcap)
            if layer == self._lead and end == pos and length == 1:
                self.counters.decode_steps += 1
            if end % c == c - 1:
                self._close_chunk(st, cur)
            pos = end + 1
        return out

    def load_dense(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, *, summaries: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Take a whole context's K/V for ``layer`` without attending it (benchmarks, tests).

        Parameters
        ----------
        layer : int
            A layer that holds no tokens yet.
        k, v : Tensor ``[B, Hkv, Lk, D]``
            Post-RoPE K/V of positions ``0 .. Lk - 1``; afterwards the layer is as if
            :meth:`forward` had run over them (chunks closed and written to the store).
        summaries : tuple of Tensor, optional
            ``(chunk_summ [B, Hkv, >= N, D], group_summ [B, Hkv, >= N, M, D])`` float32 to use
            instead of computing them (the timing of routing does not depend on their values).
        """
        self._check(layer, None, k, v)
        st = self._layers[layer]
        if st.num_tokens:
            raise ValueError(f"layer: expected an empty layer, got {st.num_tokens} tokens in layer {layer}")
        if st.slab is None:
            self._init_layer(st, k.dtype)
        c, lk = self.hga.chunk_size, k.shape[2]
        self._grow(st, -(-lk // c))
        for j in range(-(-lk // c)):
            end = min(lk, (j + 1) * c)
            self._open_chunk(st, j)
            slot = self._ring_slot(j)
            st.ring[:, slot, 0, :, : end - j * c] = k[:, :, j * c : end]
            st.ring[:, slot, 1, :, : end - j * c] = v[:, :, j * c : end]
            st.num_tokens = end
            if end == (j + 1) * c:
                self._close_chunk(st, j, summaries)

    def _attend(
        self, st: _Layer, q: torch.Tensor, p0: int, p1: int, scale: float, *,
        sinks: torch.Tensor | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        """Queries at ``p0 .. p1`` (one chunk) over the layer; a block whose routed chunks do not
        fit in the host tier at once is split in halves (routing is per position, so the
        result is the same)."""
        carry = st.carry
        # The kernels advance their carry in place while routing: keep it for a retry.
        saved = st.running.clone() if st.running is not None and p0 != p1 else None
        try:
            if self.backend == "kernels" and p0 == p1:
                return self._decode_kernels(st, q, p0)
            if self.backend == "kernels":
                return self._prefill_kernels(st, q, p0, p1)
            return self._block_torch(st, q, p0, p1, scale, sinks=sinks, softcap=softcap)
        except _TooManyChunks:
            if p0 == p1:
                raise
        st.carry = carry
        if saved is not None and st.running is not None:
            st.running.copy_(saved)
        mid = (p0 + p1) // 2
        opts = dict(sinks=sinks, softcap=softcap)
        first = self._attend(st, q[:, :, : mid - p0 + 1], p0, mid, scale, **opts)
        if mid == p0 and self.backend == "kernels":  # LayerDecode's output buffer: the next step rewrites it
            first = first.clone()
        return torch.cat((first, self._attend(st, q[:, :, mid - p0 + 1 :], mid + 1, p1, scale, **opts)), dim=2)

    def _check(self, layer: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != self.layout.dtype:
                raise TypeError(f"{name}: expected dtype {self.layout.dtype} (the store's layout), got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name}: expected device {self.device}, got {t.device}")
        b, hkv, d = self.batch_size, self.num_kv_heads, self.head_dim
        if k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (b, hkv, d) or v.shape != k.shape:
            raise ValueError(
                f"k, v: expected [B={b}, Hkv={hkv}, L, D={d}] each, got {list(k.shape)} and {list(v.shape)}"
            )
        if k.shape[2] == 0:
            raise ValueError("k: expected at least one new token, got 0")
        if q is None:
            return
        if q.dim() != 4 or tuple(q.shape) != (b, self.num_q_heads, k.shape[2], d):
            raise ValueError(f"q: expected [{b}, {self.num_q_heads}, {k.shape[2]}, {d}], got {list(q.shape)}")
        if q.stride(-1) != 1:
            raise ValueError(f"q: expected a contiguous last dim, got strides {q.stride()}")

    def _count(self, group_ids: torch.Tensor, p0: int, p1: int) -> None:
        """Keys attended per query and density, accumulated on the device (no host sync)."""
        if p0 == p1:  # one position (a decode step): two device ops, the window keys in Python
            fixed = int(_fixed_keys(torch.tensor([p0]), self.hga)[0])
            rows = math.prod(group_ids.shape[:-1])
            routed = (group_ids >= 0).sum()
            self._keys_fixed += rows * fixed
            self._density_fixed += rows * fixed / (p0 + 1)
            self._keys_sum.add_(routed, alpha=self.hga.group_size)
            self._density_sum.add_(routed, alpha=self.hga.group_size / (p0 + 1))
            self.counters.queries += rows
            return
        positions = torch.arange(p0, p1 + 1, device=group_ids.device)
        keys = _fixed_keys(positions, self.hga) + self.hga.group_size * (group_ids >= 0).sum(dim=-1)
        self._keys_sum += keys.sum()
        self._density_sum += (keys.double() / (positions + 1).double()).sum()
        self.counters.queries += keys.numel()

    # ------------------------------------------------------------------ kernel flow
    def decoder(self, layer: int) -> LayerDecode:
        """The kernel decode step of ``layer`` for a query at its last token (``num_tokens - 1``).

        For a caller that runs :meth:`LayerDecode.step` itself (benchmarks, graph capture): the
        slot table is brought up to date here, and the step assumes every chunk stays in the
        host tier (the engine's residency checks are not part of it). A running-max chunk
        score continues from the layer's device carry: the maxima of the earlier queries of
        the current chunk, -inf where none ran (after :meth:`load_dense`).
        """
        st = self._layers[layer]
        if self.backend != "kernels":
            raise ValueError(f"decoder: expected backend 'kernels', got {self.backend!r}")
        if st.num_tokens == 0:
            raise ValueError(f"decoder: expected layer {layer} to hold tokens, got none")
        dec = self._decoder(st, st.num_tokens - 1)
        with self.store.host_lock():
            self._drain(st)  # a caller runs dec.step() directly: the device slot table must be current
        return dec

    def _decoder(self, st: _Layer, position: int) -> LayerDecode:
        dec = st.decode
        if dec is None or not dec.fits(position):
            with _normal_tensors():
                dec = LayerDecode(self, st, position)
            st.decode = dec
        dec.move_to(position)
        return dec

    def _decode_kernels(self, st: _Layer, q: torch.Tensor, pos: int) -> torch.Tensor:
        dec = self._decoder(st, pos)
        dec.q.copy_(q)
        dec.route()
        group_ids, fetch = dec.plan[1], dec.plan[2]

        def gather() -> bool:
            if st.missing:  # some chunks of this layer are off the host tier: fetch only resident ones
                m = self.hga.groups_per_chunk
                rows = torch.arange(self.batch_size, device=self.device)[:, None, None, None]
                ok = st.host_table()[rows, fetch.clamp(min=0) // m] >= 0
                fetch.copy_(torch.where(ok & (fetch >= 0), fetch, -1))
            dec.assign()
            dec.gather()
            if self._gather_event is not None:
                self._gather_event.record()
            return True

        self._resident(st, group_ids, lambda: self._fetch_set(dec.plan[0], fetch), gather)
        out = dec.attend()
        self._gathered += dec.misses.sum()
        assert st.stamp is not None and st.counter is not None
        self._cache_used += (st.stamp == (st.counter[..., None] - 1)).sum()
        self._count(group_ids, pos, pos)
        self.last_group_ids = group_ids
        return out[:, :, None]

    def _prefill_kernels(self, st: _Layer, q: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
        from kvtier.attention import _route, prefill_tables
        from kvtier.kernels.gather_groups import gather_groups
        from kvtier.kernels.sparse_prefill import sparse_prefill

        cfg = self.hga
        c, g, m = cfg.chunk_size, cfg.group_size, cfg.groups_per_chunk
        b, hq, lb, d = q.shape
        hkv, rep, dev = self.num_kv_heads, self.rep, self.device
        widths = plan_widths(cfg, p1)
        plan = [torch.full((b, hq, lb, w), -1, dtype=torch.int64, device=dev) for w in widths]
        routed = torch.full((b, hq, lb, widths[1]), -1, dtype=torch.int32, device=dev)
        assert st.cs is not None and st.gs is not None
        # One chunk's positions: the kernels' carry may be read and written in place.
        carry = None if st.running is None else (st.running, st.running)
        _route(q, st.cs, st.gs, p0, cfg, widths, (*plan, routed), precision=self._precision(), carry=carry)
        group_ids = plan[1]
        ids = group_ids.reshape(b, hkv, -1)
        union, u = _union(ids)
        if u:
            self.counters.host_syncs += int(dev.type != "cpu")
        nb = b * self.hot
        scratch = torch.empty(nb + -(-b * max(u, 1) // m), 2, hkv, c, d, dtype=q.dtype, device=dev)
        scratch[:nb].copy_(st.slab[:nb])  # type: ignore[index]
        base = nb * m

        def gather() -> bool:
            if u == 0:
                return True
            valid = union < _BIG
            rows = torch.arange(b, device=dev)[:, None, None]
            slots = st.host_table()[rows, torch.where(valid, union // m, 0)]
            src = torch.where(valid, slots.long() * m + union % m, -1)
            dst = base + rows * u + torch.arange(u, device=dev)
            kvh = torch.arange(hkv, device=dev)[None, :, None].expand_as(src)
            table = torch.stack((src, dst.expand_as(src), kvh), dim=-1).reshape(-1, 3).to(torch.int32)
            gather_groups(self.store.host_slab, table, scratch, group_size=g)
            if self._gather_event is not None:
                self._gather_event.record()
            self._gathered += valid.sum()
            return True

        self._resident(st, group_ids, lambda: self._fetch_set(plan[0], plan[2]), gather)
        if u:
            at = torch.searchsorted(union, ids.clamp(min=0))
            rows = torch.arange(b, device=dev)[:, None, None]
            blocks = torch.where(ids >= 0, base + rows * u + at, -1).reshape(group_ids.shape)
        else:
            blocks = group_ids
        tab, num, vis = prefill_tables(blocks, p0, c)
        out = torch.empty_like(q)
        sparse_prefill(
            q, scratch[:, 0], scratch[:, 1], tab, num, vis, out, start_pos=p0, chunk_size=c, group_size=g,
            sink_chunks=cfg.sink_chunks, local_chunks=cfg.local_chunks, slot_map=st.slot_map,
        )  # fmt: skip
        self._count(group_ids, p0, p1)
        self.last_group_ids = group_ids
        return out

    def _precision(self) -> str:
        # tf32x3: three tf32 products, about fp32 accurate and faster on the H200 (docs/kernels.md);
        # the interpreter computes in plain fp32 either way.
        return "tf32x3" if self.device.type == "cuda" else "ieee"

    # ------------------------------------------------------------------ bookkeeping
    def host_slots(self, layer: int) -> torch.Tensor:
        """The slot table of ``layer``: ``[B, N]`` int32 (CPU copy), host slab slot or -1 per closed chunk."""
        st = self._layers[layer]
        with self.store.host_lock():
            if st.host_cpu is None:
                return torch.empty(self.batch_size, 0, dtype=torch.int32)
            return st.host_cpu[:, : st.num_closed].clone()

    def device_resident_bytes(self) -> int:
        """Bytes of engine state on the compute device (summaries, ring and cache slabs, tables)."""
        total = 0
        for st in self._layers:
            for t in (st.cs, st.gs, st.slab, st.slot_map, st.host_dev, st.where, st.tags, st.stamp, st.running):
                if t is not None and t.device.type == self.device.type:
                    total += t.numel() * t.element_size()
        return total

    def stats(self) -> dict[str, Any]:
        """What the engine attended and moved (reads the device counters: one host sync).

        Returns
        -------
        dict
            ``backend``, ``tokens`` and ``closed_chunks`` (of the lowest layer holding tokens: the
            first full-attention layer of a hybrid model), ``queries``,
            ``mean_keys_per_query``, ``density``, ``decode_steps``; ``groups_gathered``
            (host slab to compute device), ``host_bytes_gathered``, ``device_cache_hit_rate``
            (kernels: distinct groups asked that were cached; None with torch ops),
            ``disk_waits`` (routed chunks a block waited for), ``disk_wait_s``,
            ``prefetch_issued``, ``prefetch_hits``, ``prefetch_hit_share`` (of the routed
            chunks that were on disk, the share prefetch made host-resident in time; None
            before any), ``host_syncs``, ``fence_waits``, ``cuda_graphs`` (False: the engine
            runs eagerly; :class:`LayerDecode` steps can be captured by a caller) and
            ``device_resident_bytes``.
        """
        c = self.counters
        lead = self._lead or 0
        gathered = int(self._gathered)
        used = int(self._cache_used)
        asked_disk = c.prefetch_hits + c.disk_waits
        return {
            "backend": self.backend,
            "tokens": self._layers[lead].num_tokens,
            "closed_chunks": self._layers[lead].num_closed,
            "queries": c.queries,
            "mean_keys_per_query": (float(self._keys_sum) + self._keys_fixed) / c.queries if c.queries else 0.0,
            "density": (float(self._density_sum) + self._density_fixed) / c.queries if c.queries else 0.0,
            "decode_steps": c.decode_steps,
            "groups_gathered": gathered,
            "host_bytes_gathered": gathered * self.layout.group_bytes,
            "device_cache_hit_rate": (1.0 - gathered / used) if used else None,
            "cache_hits": max(0, used - gathered),
            "cache_misses": gathered if self.backend == "kernels" else 0,
            "disk_waits": c.disk_waits,
            "disk_wait_s": c.disk_wait_s,
            "prefetch_issued": c.prefetch_issued,
            "prefetch_hits": c.prefetch_hits,
            "prefetch_hit_share": c.prefetch_hits / asked_disk if asked_disk else None,
            "host_syncs": c.host_syncs,
            "fence_waits": c.fence_waits,
            "cuda_graphs": False,
            "device_resident_bytes": self.device_resident_bytes(),
        }

    def reset_stats(self) -> None:
        """Zero the counters (the state is kept)."""
        self.counters = _Counters()
        self._keys_fixed, self._density_fixed = 0, 0.0
        for t in (self._keys_sum, self._density_sum, self._gathered, self._cache_used):
            t.zero_()

    def reset(self) -> None:
        """Forget every token of every layer and drop the rows' chunks from the store."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued gathers may still read host slots
        for b in range(self.batch_size):
            self.store.drop(self.first_seq_id + b)
        with self.store.host_lock():
            self._layers = [_Layer(i) for i in range(self.num_layers)]
            self._lead = None
        self._inflight.clear()
        self.reset_stats()

    def close(self) -> None:
        """Detach from the store (the store itself is the caller's to close)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.store.unwatch_host_slots(self._on_host_slot)
        self.store.remove_host_fence(self._fence)


def engine_from_dense(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    num_q_heads: int,
    rope_theta: float,
    pin: bool = False,
    cache_entries: int | None = None,
    summaries: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> HGAEngine:
    """A one-layer engine over dense ``k, v [B, Hkv, Lk, D]``, with a store whose host tier holds them all.

    For benchmarks and tests of one layer's step: ``engine.decoder(0)`` is the kernel decode
    step of a query at position ``Lk - 1``. The caller closes ``engine.store``.
    """
    from kvtier.config import StoreConfig
    from kvtier.layout import KVLayout

    b, hkv, lk, d = k.shape
    layout = KVLayout(
        num_layers=1, num_kv_heads=hkv, head_dim=d, dtype=k.dtype,
        chunk_size=config.chunk_size, group_size=config.group_size,
    )  # fmt: skip
    n = max(1, lk // config.chunk_size)
    with _normal_tensors():
        store = TieredStore(
            layout, StoreConfig(gpu_bytes=0, host_bytes=b * n * layout.chunk_bytes, device=str(k.device)), pin_host=pin
        )
        engine = HGAEngine(
            store, config, num_q_heads=num_q_heads, batch_size=b, rope_theta=rope_theta, device=k.device,
            backend="kernels" if k.is_cuda or _interpreting() else "torch", cache_entries=cache_entries,
        )  # fmt: skip
        engine.load_dense(0, k, v, summaries=summaries)
    return engine
