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

``HGAConfig.chunk_score`` and ``group_score`` choose the scores of steps 2 and 3, and
``group_merge`` how two group rankings join (the paper's summed summaries alone:
``HGAConfig.paper()``). The ``running_*`` chunk scores take, for position t,
the maximum over the queries of t's own chunk at positions up to t: still causal (nothing
after t), and a decoder carries the maxima from one position to the next in a
:class:`RouteCarry`, so that a block of positions and the same positions one at a time give
the same plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier._checks import check_tensor
from kvtier.config import HGAConfig
from kvtier.layout import SUPPORTED_DTYPES, Windows, windows_at
from kvtier.reference.attention import masked_attention_ref
from kvtier.reference.summaries import merged_group_keys_ref, routing_summaries_ref
from kvtier.rope import RopeSpec

__all__ = [
    "RoutePlan",
    "RouteCarry",
    "HGAStats",
    "hga_attention",
    "hga_prefill_ref",
    "hga_decode_ref",
    "plan_widths",
    "route_block",
    "check_hga_inputs",
    "check_scale",
    "check_logit_options",
    "resolve_start_pos",
]


@dataclass
class RouteCarry:
    """What routing carries from one query block of a chunk to the next (running chunk scores).

    Attributes
    ----------
    next_pos : int
        The position it continues at: it holds the maxima over the queries of positions
        ``chunk_start .. next_pos - 1`` of one chunk.
    max_scores : tuple of Tensor ``[B, Hq, Ncand]`` float64
        Per ``running_*`` term of ``chunk_score`` (in order), the running maximum of its score
        for each candidate chunk (the chunks ``[sink_end, local_start)`` of that chunk's windows).
    """

    next_pos: int
    max_scores: tuple[torch.Tensor, ...]


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
    carry : RouteCarry or None
        After the last position, for the next block of the same chunk; None unless
        ``chunk_score`` keeps a running max.
    """

    chunk_ids: torch.Tensor
    group_ids: torch.Tensor
    fetch_group_ids: torch.Tensor
    carry: RouteCarry | None = None


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


def _group_queries(q64: torch.Tensor, group_score: str) -> tuple[torch.Tensor, ...]:
    """Per term of ``group_score``, the vector the group keys ``[..., Dg]`` are dotted with.

    The sum dots q with the group summary; the bound ``sum_i max(q_i mn_i, q_i mx_i)`` is
    ``min(q, 0) . mn + max(q, 0) . mx``. With ``"sum+bound"`` (keys ``[sum, min, max]``) each
    term's vector is zero over the other's dims.
    """
    lo, hi, zero = q64.clamp(max=0), q64.clamp(min=0), torch.zeros_like(q64)
    if group_score == "sum":
        return (q64,)
    if group_score == "bound":
        return (torch.cat((lo, hi), dim=-1),)
    return torch.cat((q64, zero, zero), dim=-1), torch.cat((zero, lo, hi), dim=-1)


def _split_best_first(first: torch.Tensor, second: torch.Tensor, k: int, k1: int, kf: int) -> torch.Tensor:
    """Indices, best first: ``k1`` by ``first``, up to ``k`` by ``second`` among the rest, up to ``kf`` by ``first``."""
    a = _best_first(first, k1)
    b = _best_first(second.scatter(-1, a, float("-inf")), k - k1)
    taken = torch.cat((a, b), dim=-1)
    rest = _best_first(first.scatter(-1, taken, float("-inf")), kf - k)
    return torch.cat((taken, rest), dim=-1)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each element's place in :func:`_best_first`'s order along the last dim (0 the best)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    places = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)


def _rank_best_first(first: torch.Tensor, second: torch.Tensor, k: int, kf: int, reserve: int = 0) -> torch.Tensor:
    """Indices: ``r = min(reserve, k // 2)`` by ``first``, ``r`` by ``second`` among the rest, then
    up to ``k`` of least rank sum under the two (ranks over every candidate; ties to the lesser
    rank, then the lower index), then up to ``kf`` by ``first`` among the rest."""
    r = min(reserve, k // 2)
    a = _best_first(first, r)
    reserved = torch.cat((a, _best_first(second.scatter(-1, a, float("-inf")), r)), dim=-1)
    ra, rb = _ranks(first), _ranks(second)
    n = first.shape[-1]
    # Sorted by rank sum, then lesser rank, then index: stable sorts from the last key to the first.
    by_lesser = torch.sort(torch.minimum(ra, rb), dim=-1, stable=True).indices
    rank_sum = (ra + rb).scatter(-1, reserved, 2 * n)  # the reserved after every other candidate
    order = torch.gather(by_lesser, -1, torch.sort(torch.gather(rank_sum, -1, by_lesser), dim=-1, stable=True).indices)
    taken = torch.cat((reserved, order[..., : k - 2 * r]), dim=-1)
    rest = _best_first(first.scatter(-1, taken, float("-inf")), kf - k)
    return torch.cat((taken, rest), dim=-1)


def _carry_in(
    config: HGAConfig, win: Windows, first_pos: int | None, carry: RouteCarry | None, shape: tuple[int, ...]
) -> tuple[torch.Tensor, ...] | None:
    """Validated running maxima of the positions before ``first_pos`` in its chunk (None at the chunk's start)."""
    c = config.chunk_size
    b, hq, lb = shape
    if isinstance(first_pos, bool) or not isinstance(first_pos, int):
        raise ValueError(
            f"first_pos: expected the block's first position (chunk_score={config.chunk_score!r} keeps a "
            f"running max), got {first_pos!r}"
        )
    chunk_start = win.current * c
    if not chunk_start <= first_pos <= first_pos + lb - 1 < chunk_start + c:
        raise ValueError(
            f"first_pos: expected {lb} positions inside chunk {win.current} ({chunk_start}..{chunk_start + c - 1}), "
            f"got first_pos={first_pos}"
        )
    if first_pos == chunk_start:
        return None  # a new chunk: any carry belongs to the previous one
    if not isinstance(carry, RouteCarry) or carry.next_pos != first_pos:
        got = type(carry).__name__ if not isinstance(carry, RouteCarry) else f"next_pos={carry.next_pos}"
        raise ValueError(
            f"carry: expected the RouteCarry of positions {chunk_start}..{first_pos - 1} (next_pos={first_pos}), got {got}"
        )
    n_running = sum(t.startswith("running_") for t in config.chunk_score_terms)
    want = (b, hq, win.num_candidates)
    if len(carry.max_scores) != n_running or any(tuple(t.shape) != want for t in carry.max_scores):
        raise ValueError(
            f"carry: expected {n_running} tensors {list(want)}, got {[list(t.shape) for t in carry.max_scores]}"
        )
    return carry.max_scores


def route_block(
    q: torch.Tensor,
    chunk_summ: torch.Tensor,
    group_summ: torch.Tensor,
    win: Windows,
    config: HGAConfig,
    widths: tuple[int, int, int],
    *,
    first_pos: int | None = None,
    carry: RouteCarry | None = None,
) -> RoutePlan:
    """Route queries that share one current chunk (so one set of windows), each on its own.

    The routing step of the reference, public so that integrations (``kvtier.hf``, the
    engine) route exactly as the specification does.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lb, D]``
        Post-RoPE queries whose positions all lie in chunk ``win.current``.
    chunk_summ : Tensor ``[B, Hkv, N, D]`` float32, ``N >= win.local_start``
    group_summ : Tensor ``[B, Hkv, N, M, Dg]`` float32, ``Dg = config.group_key_dim(D)``
        From :func:`kvtier.reference.summaries.routing_summaries_ref`.
    win : Windows
        From :func:`kvtier.layout.windows_at` for any position of the block.
    config : HGAConfig
    widths : tuple of int
        ``(Kc, Kg, Kf)`` from :func:`plan_widths`.
    first_pos : int, optional
        Position of ``q[:, :, 0]``; required when ``config.running_routing`` (the block's
        positions are then consecutive).
    carry : RouteCarry, optional
        ``plan.carry`` of the call that routed the previous positions; required when a
        running score starts after the chunk's first position, ignored at a chunk start.

    Returns
    -------
    RoutePlan with tensors ``[B, Hq, Lb, K*]`` and, for running scores, the carry after the
    block's last position.

    Raises
    ------
    ValueError
        On group summaries of the wrong width for ``group_score``, or a missing or
        mismatched ``first_pos`` / ``carry`` for running scores.
    """
    b, hq, lb, d = q.shape
    rep = hq // chunk_summ.shape[1]
    m = config.groups_per_chunk
    kc_w, kg_w, kf_w = widths
    dg = config.group_key_dim(d)
    if group_summ.shape[-1] != dg:
        raise ValueError(
            f"group_summ: expected a last dim of {dg} for group_score={config.group_score!r}, "
            f"got shape {list(group_summ.shape)}"
        )
    prior = _carry_in(config, win, first_pos, carry, (b, hq, lb)) if config.running_routing else None
    empty = torch.full((b, hq, lb, 0), -1, dtype=torch.long, device=q.device)
    if win.num_candidates == 0 or config.top_chunks == 0:
        out_carry = None
        if config.running_routing:  # nothing to rank, but the next block still expects a carry
            n_running = sum(t.startswith("running_") for t in config.chunk_score_terms)
            zeros = q.new_zeros(b, hq, win.num_candidates, dtype=torch.float64)
            assert first_pos is not None
            out_carry = RouteCarry(first_pos + lb, tuple(zeros for _ in range(n_running)))
        return RoutePlan(_pad(empty, kc_w), _pad(empty, kg_w), _pad(empty, kf_w), out_carry)

    q64 = q.to(torch.float64) / math.sqrt(d)
    qgs = _group_queries(q64, config.group_score)
    qg = qgs[-1]  # what a max_group chunk term ranks by: the bound when there is one
    ncand = win.num_candidates
    hkv = chunk_summ.shape[1]

    def per_kv_head(vec: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``vec [B, Hq, Lb, X]`` dotted with ``keys [B, Hkv, K, X]`` -> ``[B, Hq, Lb, K]``: query
        head h with KV head h // rep, one matmul per KV head (no head-expanded copy of the keys)."""
        return torch.matmul(vec.reshape(b, hkv, rep * lb, -1), keys.transpose(-1, -2)).reshape(b, hq, lb, -1)

    cand = chunk_summ[:, :, win.sink_end : win.local_start].to(torch.float64)  # [B, Hkv, Ncand, D]
    cand_keys = group_summ[:, :, win.sink_end : win.local_start].to(torch.float64)  # [B, Hkv, Ncand, M, Dg]
    flat_keys = cand_keys.reshape(b, hkv, ncand * m, dg)
    # Every candidate group's score [B, Hq, Lb, Ncand * M] per term of qgs, computed once: a
    # max_group term over groups (not units) and the group level's bound half share qg's (at
    # 16K on the CPU these float64 scans of every candidate are most of a decode step's routing).
    every_group: dict[int, torch.Tensor] = {}

    def every_group_score(i: int) -> torch.Tensor:
        if i not in every_group:
            every_group[i] = per_kv_head(qgs[i], flat_keys)
        return every_group[i]

    term_scores: list[torch.Tensor] = []  # each [B, Hq, Lb, Ncand]
    running_out: list[torch.Tensor] = []
    for term in config.chunk_score_terms:
        if term.endswith("max_group"):  # every group (or unit of max_group_size) of every candidate chunk
            if config.groups_per_max_group == 1:
                every = every_group_score(len(qgs) - 1)  # qg is qgs[-1]
            else:
                units = merged_group_keys_ref(cand_keys, config.group_score, d, config.groups_per_max_group)
                every = per_kv_head(qg, units.reshape(b, hkv, -1, dg))
            scores = every.reshape(b, hq, lb, ncand, -1).amax(dim=-1)
        else:
            scores = per_kv_head(q64, cand)
        if term.startswith("running_"):
            scores = torch.cummax(scores, dim=2).values  # over the block's positions, in order
            if prior is not None:
                scores = torch.maximum(scores, prior[len(running_out)][:, :, None])
            running_out.append(scores[:, :, -1].clone())
        term_scores.append(scores)
    kc = min(config.top_chunks, ncand)
    if len(term_scores) == 1:
        local_ids = _best_first(term_scores[0], kc)
    else:  # half by the first score, the rest by the second among the chunks left
        k1 = -(-kc // 2)
        first = _best_first(term_scores[0], k1)
        rest = term_scores[1].scatter(-1, first, float("-inf"))
        local_ids = torch.cat((first, _best_first(rest, kc - k1)), dim=-1)
    chunk_ids = local_ids + win.sink_end  # [B, Hq, Lb, kc]

    # Every candidate group's score, then the routed chunks' columns taken: the dot products of
    # scoring the routed groups alone (up to float64 summation order, which only exact ties can
    # see). Gathering those groups' keys per query instead (a float64 copy of
    # [B, Hq, Lb, Kc * M, Dg]) took two thirds of `kvtier demo`'s HGA prefill on the CPU.
    cols = (local_ids[..., None] * m + torch.arange(m, device=q.device)).reshape(b, hq, lb, kc * m)
    group_scores = [torch.gather(every_group_score(i), 3, cols) for i in range(len(qgs))]  # each [B, Hq, Lb, kc * M]
    global_ids = cols + win.sink_end * m
    kf = min(config.fetch_groups, kc * m)
    kg = min(config.top_groups, kc * m)
    if len(group_scores) == 1:
        order = _best_first(group_scores[0], kf)
    elif config.group_merge == "rank":
        order = _rank_best_first(group_scores[0], group_scores[1], kg, kf, config.group_reserve)
    else:
        order = _split_best_first(group_scores[0], group_scores[1], kg, -(-kg // 2), kf)
    fetch_ids = torch.gather(global_ids, 3, order)
    out_carry = None
    if config.running_routing:
        assert first_pos is not None
        out_carry = RouteCarry(first_pos + lb, tuple(running_out))
    return RoutePlan(_pad(chunk_ids, kc_w), _pad(fetch_ids[..., :kg], kg_w), _pad(fetch_ids, kf_w), out_carry)


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


def check_hga_inputs(
    q: object, k: object, v: object, config: object, rope_theta: object, start_pos: object, *, rope: object = None
) -> RopeSpec:
    """Validate the arguments of :func:`hga_attention` ("expected X, got Y" errors); the RoPE to use."""
    check_tensor("q", q, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=SUPPORTED_DTYPES)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if not isinstance(config, HGAConfig):
        raise TypeError(f"config: expected an HGAConfig, got {type(config).__name__}")
    if (rope_theta is None) == (rope is None):
        raise ValueError(
            f"rope_theta, rope: expected exactly one of them, got rope_theta={rope_theta!r} and "
            f"rope={'None' if rope is None else type(rope).__name__}"
        )
    if rope is not None and not isinstance(rope, RopeSpec):
        raise TypeError(f"rope: expected a kvtier.rope.RopeSpec, got {type(rope).__name__}")
    if rope is None and (isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0):
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
        raise ValueError(f"k: expected a number of KV heads dividing {hq} query heads, got {hkv}{_bhld_hint(q, k)}")
    if lq == 0:
        raise ValueError("q: expected at least one query position, got 0")
    if lk < start_pos + lq:
        raise ValueError(
            f"k: expected at least start_pos + Lq = {start_pos + lq} key positions, got {lk}{_bhld_hint(q, k)}"
        )
    if rope is None:
        return RopeSpec.plain(d, float(rope_theta))  # type: ignore[arg-type]
    assert isinstance(rope, RopeSpec)
    if rope.head_dim != d:
        raise ValueError(f"rope: expected a spec for head dim {d} like q, got head_dim={rope.head_dim}")
    return rope


def _bhld_hint(q: torch.Tensor, k: torch.Tensor) -> str:
    """A hint for inputs that look ``[B, L, H, D]`` (more "heads" than positions in k); "" otherwise."""
    if k.shape[1] <= k.shape[2]:
        return ""
    return (f"; expected [B, H, L, D], got q {list(q.shape)} and k {list(k.shape)}, which look like "
            "[B, L, H, D]: transpose(1, 2)?")


def resolve_start_pos(q: object, k: object, start_pos: int | None) -> object:
    """``start_pos`` as given, or for None the position that makes the queries the context's last
    ``Lq`` positions (``Lk - Lq``, a decode step's default; 0 when ``Lq >= Lk``)."""
    if start_pos is None and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4:
        return max(0, k.shape[2] - q.shape[2])
    return start_pos


def check_logit_options(sinks: object, softcap: object, q: torch.Tensor) -> None:
    """Validate ``sinks`` (Tensor ``[Hq]``) and ``softcap`` (a positive number), both optional."""
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
            shape = list(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
            raise ValueError(f"sinks: expected a tensor [{q.shape[1]}] (one logit per query head), got {shape}")
        if sinks.device != q.device:
            raise ValueError(f"sinks: expected device {q.device} like q, got {sinks.device}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap: expected a positive number or None, got {softcap!r}")


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` for None, else a positive finite number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale: expected a positive number or None, got {scale!r}")
    return float(scale)


def _context(positions: torch.Tensor) -> torch.Tensor:
    return positions + 1


def _check_carry(route_carry: object) -> None:
    if route_carry is not None and not isinstance(route_carry, RouteCarry):
        raise TypeError(f"route_carry: expected a RouteCarry or None, got {type(route_carry).__name__}")


def _cat_plans(plans: list[RoutePlan]) -> RoutePlan:
    """Plans of consecutive blocks as one (positions along dim 2), with the last block's carry."""
    fields = (torch.cat([getattr(p, f) for p in plans], dim=2) for f in ("chunk_ids", "group_ids", "fetch_group_ids"))
    return RoutePlan(*fields, carry=plans[-1].carry)


def hga_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    rope_theta: float | None = None,
    rope: RopeSpec | None = None,
    start_pos: int | None = None,
    route_carry: RouteCarry | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, HGAStats]:
    """HGA, chunk-parallel: the queries of each chunk are routed and attended as one block.

    Same parameters and result as :func:`hga_attention`.
    """
    start_pos = resolve_start_pos(q, k, start_pos)
    spec = check_hga_inputs(q, k, v, config, rope_theta, start_pos, rope=rope)
    scale = check_scale(scale, q.shape[-1])
    check_logit_options(sinks, softcap, q)
    _check_carry(route_carry)
    b, hq, lq, d = q.shape
    c = config.chunk_size
    last = start_pos + lq - 1
    num_closed = last // c
    chunk_summ, group_summ = routing_summaries_ref(k[:, :, : num_closed * c], config, spec)
    widths = plan_widths(config, last)
    positions = torch.arange(start_pos, last + 1, device=q.device)
    out = torch.empty_like(q)
    keys = torch.empty(b, hq, lq, dtype=torch.long, device=q.device)
    plans: list[RoutePlan] = []
    carry = route_carry
    block_start = start_pos
    while block_start <= last:
        block_end = min(last, (block_start // c + 1) * c - 1)  # last position of this chunk
        rows = slice(block_start - start_pos, block_end - start_pos + 1)
        win = windows_at(block_start, c, config.sink_chunks, config.local_chunks)
        q_blk = q[:, :, rows].float()
        plan = route_block(q_blk, chunk_summ, group_summ, win, config, widths, first_pos=block_start, carry=carry)
        carry = plan.carry
        visible = _visibility(positions[rows], plan.group_ids, win, block_end + 1, config)
        out[:, :, rows] = masked_attention_ref(
            q[:, :, rows], k[:, :, : block_end + 1], v[:, :, : block_end + 1], visible, scale=scale,
            sinks=sinks, softcap=softcap,
        )
        keys[:, :, rows] = visible.sum(dim=-1)
        plans.append(plan)
        block_start = block_end + 1
    return out, HGAStats(keys, _context(positions), _cat_plans(plans))


def hga_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    rope_theta: float | None = None,
    rope: RopeSpec | None = None,
    start_pos: int | None = None,
    route_carry: RouteCarry | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, HGAStats]:
    """HGA one position at a time, as a decoder runs it: summaries are appended as chunks close.

    Same parameters and result as :func:`hga_attention`.
    """
    start_pos = resolve_start_pos(q, k, start_pos)
    spec = check_hga_inputs(q, k, v, config, rope_theta, start_pos, rope=rope)
    scale = check_scale(scale, q.shape[-1])
    check_logit_options(sinks, softcap, q)
    _check_carry(route_carry)
    b, hq, lq, d = q.shape
    c = config.chunk_size
    widths = plan_widths(config, start_pos + lq - 1)
    chunk_summ: list[torch.Tensor] = []  # one [B, Hkv, 1, D] per closed chunk
    group_summ: list[torch.Tensor] = []  # one [B, Hkv, 1, M, Dg] per closed chunk
    outs, keys, plans = [], [], []
    carry = route_carry
    dg = config.group_key_dim(d)
    for i in range(lq):
        t = start_pos + i
        while len(chunk_summ) < t // c:  # chunk j closed: summarise it once
            j = len(chunk_summ)
            cs_j, gs_j = routing_summaries_ref(k[:, :, j * c : (j + 1) * c], config, spec, start=j * c)
            chunk_summ.append(cs_j)
            group_summ.append(gs_j)
        win = windows_at(t, c, config.sink_chunks, config.local_chunks)
        hkv = k.shape[1]
        cs = torch.cat(chunk_summ, dim=2) if chunk_summ else q.new_zeros(b, hkv, 0, d, dtype=torch.float32)
        gs = torch.cat(group_summ, dim=2) if group_summ else q.new_zeros(b, hkv, 0, config.groups_per_chunk, dg, dtype=torch.float32)
        plan = route_block(q[:, :, i : i + 1].float(), cs, gs, win, config, widths, first_pos=t, carry=carry)
        carry = plan.carry
        pos = torch.tensor([t], device=q.device)
        visible = _visibility(pos, plan.group_ids, win, t + 1, config)
        outs.append(masked_attention_ref(
            q[:, :, i : i + 1], k[:, :, : t + 1], v[:, :, : t + 1], visible, scale=scale, sinks=sinks, softcap=softcap
        ))  # fmt: skip
        keys.append(visible.sum(dim=-1))
        plans.append(plan)
    positions = torch.arange(start_pos, start_pos + lq, device=q.device)
    return torch.cat(outs, dim=2), HGAStats(torch.cat(keys, dim=2), _context(positions), _cat_plans(plans))


def hga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    rope_theta: float | None = None,
    rope: RopeSpec | None = None,
    start_pos: int | None = None,
    route_carry: RouteCarry | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
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
    rope_theta : float, optional
        RoPE base of a model with plain RoPE (half-split pairs over the whole head).
    rope : RopeSpec, optional
        The model's RoPE (:func:`kvtier.rope.rope_spec_of`: scaled frequencies, partial or
        interleaved rotary dims). Exactly one of ``rope_theta`` and ``rope`` is given; the
        routing summaries use its per-pair frequencies.
    start_pos : int, optional
        Position of the first query. None (the default) means ``Lk - Lq``: the queries are the
        last ``Lq`` positions of the context, as in a decode step (``q[:, :, -1:]`` over all
        keys) or a prefill of the whole context (``Lq == Lk``).
    route_carry : RouteCarry, optional
        With a ``running_*`` chunk score and ``start_pos`` inside a chunk, the running maxima of
        the chunk's earlier queries: ``stats.plan.carry`` of the call that ended at
        ``start_pos - 1``. Not needed at a chunk boundary or for the other scores.
    scale : float, optional
        Softmax scale of the attention; ``D ** -0.5`` when None. Routing ranks are unaffected.
    sinks : Tensor ``[Hq]``, optional
        Per-head sink logits (gpt-oss): one more softmax entry per query, carrying no value.
        Routing is unaffected.
    softcap : float, optional
        Logit soft-capping ``softcap * tanh(logit / softcap)`` (Gemma-2) in the exact attention;
        routing scores stay the summaries' dot products.

    Returns
    -------
    out : Tensor ``[B, Hq, Lq, D]`` in ``q.dtype``
    stats : HGAStats
        Keys attended per query, density and the routing plan (``stats.plan.carry`` for the
        next call).

    Raises
    ------
    TypeError, ValueError
        On a wrong type, dtype, shape, device, an inconsistent length, or a running score
        started inside a chunk without the matching ``route_carry``.
    """
    path = hga_decode_ref if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] == 1 else hga_prefill_ref
    return path(
        q, k, v, config=config, rope_theta=rope_theta, rope=rope, start_pos=start_pos, route_carry=route_carry,
        scale=scale, sinks=sinks, softcap=softcap,
    )
