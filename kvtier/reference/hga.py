"""Hierarchical Global Attention, the reference: plain torch, per-position routing, fp32 math.

For a query at absolute position t in chunk ``c = t // C`` (see :func:`kvtier.layout.windows_at`):

1. sink chunks ``[0, min(F, c))`` and the local window of the last L closed chunks are
   attended in full, and so are the tokens of chunk c up to t (causal);
2. the closed chunks between those windows are candidates: each query head scores their
   chunk summaries (of its KV head) and keeps its top ``top_chunks``;
3. it scores the group summaries inside those chunks and keeps its top ``top_groups``;
4. exact softmax attention in float32 over the union of 1 and the tokens of 3.

Routing depends on nothing but the query's own vector and keys at positions before its
chunk, so the result of a position never depends on any later token or query, and the
prefill path (one block of positions per chunk, routed together) equals the decode path
(one position at a time, summaries appended as chunks close). A block may *fetch* the union
of what its positions chose, but every position attends only its own choice.

Routing scores are computed in float64 from float32 summaries so that neither the block
shape nor the batch changes a selection; ties go to the lower chunk or group index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier._checks import check_tensor
from kvtier.config import HGAConfig
from kvtier.layout import SUPPORTED_DTYPES, Windows, windows_at
from kvtier.reference.attention import masked_attention_ref
from kvtier.reference.rope import rope_inv_freq
from kvtier.reference.summaries import chunk_summaries_ref, group_summaries_ref

__all__ = [
    "RoutePlan",
    "HGAStats",
    "hga_attention",
    "hga_prefill_ref",
    "hga_decode_ref",
    "plan_widths",
    "route_block",
    "check_hga_inputs",
]


@dataclass
class RoutePlan:
    """Routing decisions of every (batch, query head, query position), best first.

    Attributes
    ----------
    chunk_ids : Tensor ``[B, Hq, Lq, Kc]`` int64
        Routed chunk indices, ``-1`` where fewer than ``Kc`` candidates exist.
    group_ids : Tensor ``[B, Hq, Lq, Kg]`` int64
        Attended groups as global group indices (``chunk * M + group``), ``-1`` padded.
    fetch_group_ids : Tensor ``[B, Hq, Lq, Kf]`` int64
        Groups worth making resident: ``group_ids`` followed by the next best (prefetch).
    """

    chunk_ids: torch.Tensor
    group_ids: torch.Tensor
    fetch_group_ids: torch.Tensor


@dataclass
class HGAStats:
    """What one HGA call attended.

    Attributes
    ----------
    keys_per_query : Tensor ``[B, Hq, Lq]`` int64
        Keys each query attended: sinks, local window, routed groups and its own chunk.
    context_per_query : Tensor ``[Lq]`` int64
        Keys that dense causal attention would have used (position + 1).
    plan : RoutePlan
    """

    keys_per_query: torch.Tensor
    context_per_query: torch.Tensor
    plan: RoutePlan

    @property
    def mean_keys_per_query(self) -> float:
        """Keys attended per query, averaged over batch, heads and positions."""
        return float(self.keys_per_query.double().mean())

    @property
    def density(self) -> float:
        """Mean over queries of keys attended / causal context length (1.0 means dense)."""
        return float((self.keys_per_query.double() / self.context_per_query.double()).mean())


def plan_widths(config: HGAConfig, last_position: int) -> tuple[int, int, int]:
    """Widths ``(Kc, Kg, Kf)`` of the plan tensors: budgets clipped to what exists at ``last_position``.

    The number of candidates never shrinks as the position grows, so the last position of a
    call bounds all of them.
    """
    w = windows_at(last_position, config.chunk_size, config.sink_chunks, config.local_chunks)
    kc = min(config.top_chunks, w.num_candidates)
    m = config.groups_per_chunk
    return kc, min(config.top_groups, kc * m), min(config.fetch_groups, kc * m)


def _best_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, best first, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _pad(ids: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - ids.shape[-1]
    return torch.nn.functional.pad(ids, (0, missing), value=-1) if missing > 0 else ids


def route_block(
    q: torch.Tensor,
    chunk_summ: torch.Tensor,
    group_summ: torch.Tensor,
    win: Windows,
    config: HGAConfig,
    widths: tuple[int, int, int],
) -> RoutePlan:
    """Route queries that share one current chunk (so one set of windows), each on its own.

    The routing step of the reference, public so that integrations (``kvtier.hf``) route
    exactly as the specification does.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lb, D]``
        Post-RoPE queries whose positions all lie in chunk ``win.current``.
    chunk_summ : Tensor ``[B, Hkv, N, D]`` float32, ``N >= win.local_start``
    group_summ : Tensor ``[B, Hkv, N, M, D]`` float32
    win : Windows
        From :func:`kvtier.layout.windows_at` for any position of the block.
    config : HGAConfig
    widths : tuple of int
        ``(Kc, Kg, Kf)`` from :func:`plan_widths`.

    Returns
    -------
    RoutePlan with tensors ``[B, Hq, Lb, K*]``.
    """
    b, hq, lb, d = q.shape
    rep = hq // chunk_summ.shape[1]
    m = config.groups_per_chunk
    kc_w, kg_w, kf_w = widths
    empty = torch.full((b, hq, lb, 0), -1, dtype=torch.long, device=q.device)
    if win.num_candidates == 0 or config.top_chunks == 0:
        return RoutePlan(_pad(empty, kc_w), _pad(empty, kg_w), _pad(empty, kf_w))

    q64 = q.to(torch.float64) / math.sqrt(d)
    cand = chunk_summ[:, :, win.sink_end : win.local_start].to(torch.float64)
    cand = cand.repeat_interleave(rep, dim=1)  # [B, Hq, Ncand, D]
    chunk_scores = torch.matmul(q64, cand.transpose(-1, -2))  # [B, Hq, Lb, Ncand]
    kc = min(config.top_chunks, win.num_candidates)
    chunk_ids = _best_first(chunk_scores, kc) + win.sink_end  # [B, Hq, Lb, kc]

    groups = group_summ.to(torch.float64).repeat_interleave(rep, dim=1)  # [B, Hq, N, M, D]
    n = groups.shape[2]
    groups = groups.reshape(b, hq, 1, n, m * d).expand(b, hq, lb, n, m * d)
    picked = torch.gather(groups, 3, chunk_ids[..., None].expand(b, hq, lb, kc, m * d))
    picked = picked.reshape(b, hq, lb, kc * m, d)
    group_scores = torch.matmul(picked, q64[..., None]).squeeze(-1)  # [B, Hq, Lb, kc * M]
    global_ids = (chunk_ids[..., None] * m + torch.arange(m, device=q.device)).reshape(b, hq, lb, kc * m)
    kf = min(config.fetch_groups, kc * m)
    kg = min(config.top_groups, kc * m)
    fetch_ids = torch.gather(global_ids, 3, _best_first(group_scores, kf))
    return RoutePlan(_pad(chunk_ids, kc_w), _pad(fetch_ids[..., :kg], kg_w), _pad(fetch_ids, kf_w))


def _visibility(positions: torch.Tensor, group_ids: torch.Tensor, win: Windows, lk: int, config: HGAConfig) -> torch.Tensor:
    """Bool ``[B, Hq, Lb, Lk]``: the keys each query of one block attends."""
    c, g = config.chunk_size, config.group_size
    kpos = torch.arange(lk, device=group_ids.device)
    fixed = (kpos < win.sink_end * c) | ((kpos >= win.local_start * c) & (kpos < win.current * c))
    own_chunk = (kpos[None, :] >= win.current * c) & (kpos[None, :] <= positions[:, None])  # [Lb, Lk]
    b, hq, lb, _ = group_ids.shape
    num_groups = -(-lk // g)
    routed = torch.zeros(b, hq, lb, num_groups + 1, dtype=torch.bool, device=group_ids.device)
    routed.scatter_(3, torch.where(group_ids < 0, num_groups, group_ids), True)  # -1 -> spare column
    routed = routed[..., :num_groups].repeat_interleave(g, dim=3)[..., :lk]
    return routed | fixed | own_chunk


def check_hga_inputs(q: object, k: object, v: object, config: object, rope_theta: object, start_pos: object) -> None:
    """Validate the arguments of :func:`hga_attention`: "expected X, got Y" errors."""
    check_tensor("q", q, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=SUPPORTED_DTYPES)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if not isinstance(config, HGAConfig):
        raise TypeError(f"config: expected an HGAConfig, got {type(config).__name__}")
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
        raise ValueError(f"rope_theta: expected a positive number, got {rope_theta!r}")
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"start_pos: expected an int >= 0, got {start_pos!r}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected dtype {q.dtype} like q, got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected device {q.device} like q, got {k.device} and {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    bq, hq, lq, d = q.shape
    bk, hkv, lk, dk = k.shape
    if bk != bq:
        raise ValueError(f"k: expected batch {bq} like q, got {bk}")
    if dk != d:
        raise ValueError(f"k: expected head dim {d} like q, got {dk}")
    if d % 2 != 0:
        raise ValueError(f"q: expected an even head dim (RoPE pairs), got {d}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: expected a number of KV heads dividing {hq} query heads, got {hkv}")
    if lq == 0:
        raise ValueError("q: expected at least one query position, got 0")
    if lk < start_pos + lq:
        raise ValueError(
            f"k: expected at least start_pos + Lq = {start_pos + lq} key positions, got {lk}"
        )


def _context(positions: torch.Tensor) -> torch.Tensor:
    return positions + 1


def hga_prefill_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, config: HGAConfig, rope_theta: float, start_pos: int = 0
) -> tuple[torch.Tensor, HGAStats]:
    """HGA, chunk-parallel: the queries of each chunk are routed and attended as one block.

    Same parameters and result as :func:`hga_attention`.
    """
    check_hga_inputs(q, k, v, config, rope_theta, start_pos)
    b, hq, lq, d = q.shape
    c = config.chunk_size
    last = start_pos + lq - 1
    inv_freq = rope_inv_freq(d, rope_theta, device=q.device)
    num_closed = last // c
    chunk_summ = chunk_summaries_ref(k[:, :, : num_closed * c], c, inv_freq, config.rope_cutoff_rad)
    group_summ = group_summaries_ref(
        k[:, :, : num_closed * c], c, config.group_size, inv_freq, config.rope_cutoff_rad
    )
    widths = plan_widths(config, last)
    positions = torch.arange(start_pos, last + 1, device=q.device)
    out = torch.empty_like(q)
    keys = torch.empty(b, hq, lq, dtype=torch.long, device=q.device)
    plans: list[RoutePlan] = []
    block_start = start_pos
    while block_start <= last:
        block_end = min(last, (block_start // c + 1) * c - 1)  # last position of this chunk
        rows = slice(block_start - start_pos, block_end - start_pos + 1)
        win = windows_at(block_start, c, config.sink_chunks, config.local_chunks)
        q_blk = q[:, :, rows].float()
        plan = route_block(q_blk, chunk_summ, group_summ, win, config, widths)
        visible = _visibility(positions[rows], plan.group_ids, win, block_end + 1, config)
        out[:, :, rows] = masked_attention_ref(
            q[:, :, rows], k[:, :, : block_end + 1], v[:, :, : block_end + 1], visible
        )
        keys[:, :, rows] = visible.sum(dim=-1)
        plans.append(plan)
        block_start = block_end + 1
    plan = RoutePlan(*(torch.cat([getattr(p, f) for p in plans], dim=2) for f in ("chunk_ids", "group_ids", "fetch_group_ids")))
    return out, HGAStats(keys, _context(positions), plan)


def hga_decode_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, config: HGAConfig, rope_theta: float, start_pos: int = 0
) -> tuple[torch.Tensor, HGAStats]:
    """HGA one position at a time, as a decoder runs it: summaries are appended as chunks close.

    Same parameters and result as :func:`hga_attention`.
    """
    check_hga_inputs(q, k, v, config, rope_theta, start_pos)
    b, hq, lq, d = q.shape
    c, g = config.chunk_size, config.group_size
    inv_freq = rope_inv_freq(d, rope_theta, device=q.device)
    widths = plan_widths(config, start_pos + lq - 1)
    chunk_summ: list[torch.Tensor] = []  # one [B, Hkv, 1, D] per closed chunk
    group_summ: list[torch.Tensor] = []  # one [B, Hkv, 1, M, D] per closed chunk
    outs, keys, plans = [], [], []
    for i in range(lq):
        t = start_pos + i
        while len(chunk_summ) < t // c:  # chunk j closed: summarise it once
            j = len(chunk_summ)
            kj = k[:, :, j * c : (j + 1) * c]
            chunk_summ.append(chunk_summaries_ref(kj, c, inv_freq, config.rope_cutoff_rad, start=j * c))
            group_summ.append(group_summaries_ref(kj, c, g, inv_freq, config.rope_cutoff_rad, start=j * c))
        win = windows_at(t, c, config.sink_chunks, config.local_chunks)
        hkv = k.shape[1]
        cs = torch.cat(chunk_summ, dim=2) if chunk_summ else q.new_zeros(b, hkv, 0, d, dtype=torch.float32)
        gs = torch.cat(group_summ, dim=2) if group_summ else q.new_zeros(b, hkv, 0, c // g, d, dtype=torch.float32)
        plan = route_block(q[:, :, i : i + 1].float(), cs, gs, win, config, widths)
        pos = torch.tensor([t], device=q.device)
        visible = _visibility(pos, plan.group_ids, win, t + 1, config)
        outs.append(masked_attention_ref(q[:, :, i : i + 1], k[:, :, : t + 1], v[:, :, : t + 1], visible))
        keys.append(visible.sum(dim=-1))
        plans.append(plan)
    plan = RoutePlan(*(torch.cat([getattr(p, f) for p in plans], dim=2) for f in ("chunk_ids", "group_ids", "fetch_group_ids")))
    positions = torch.arange(start_pos, start_pos + lq, device=q.device)
    return torch.cat(outs, dim=2), HGAStats(torch.cat(keys, dim=2), _context(positions), plan)


def hga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    rope_theta: float,
    start_pos: int = 0,
) -> tuple[torch.Tensor, HGAStats]:
    """Hierarchical Global Attention, reference implementation.

    One query uses the decode path, several the prefill path; both give the same result.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]`` float32, float16 or bfloat16
        Post-RoPE queries at positions ``start_pos .. start_pos + Lq - 1``.
    k, v : Tensor ``[B, Hkv, Lk, D]``, same dtype and device as ``q``
        Post-RoPE keys and values at positions ``0 .. Lk - 1``, ``Lk >= start_pos + Lq``
        (keys after a query's position are never attended). ``Hq % Hkv == 0``.
    config : HGAConfig
    rope_theta : float
        RoPE base of the model (plain RoPE, half-split pairs).
    start_pos : int
        Position of the first query.

    Returns
    -------
    out : Tensor ``[B, Hq, Lq, D]`` in ``q.dtype``
    stats : HGAStats
        Keys attended per query, density and the routing plan.

    Raises
    ------
    TypeError, ValueError
        On a wrong type, dtype, shape, device or an inconsistent length.
    """
    path = hga_decode_ref if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] == 1 else hga_prefill_ref
    return path(q, k, v, config=config, rope_theta=rope_theta, start_pos=start_pos)
