"""``kvtier.hga_attention``: Hierarchical Global Attention on the Triton kernels or the reference.

The kernel path computes the same function as :func:`kvtier.reference.hga_attention`:
summaries with the reference's own (vectorised torch) code, routing with
``route_chunks`` + ``route_groups`` (per query row, exact plan), attention with
``sparse_decode`` (one query) or ``sparse_prefill`` (query blocks of one chunk) over the
dense K/V, reading only the windows and the routed groups.
"""

from __future__ import annotations

import math
import os

import torch

from kvtier.config import CHUNK_SCORE_TERMS, GROUP_MERGES, HGAConfig
from kvtier.kernels.route_chunks import route_chunks, route_chunks_tiles
from kvtier.kernels.route_groups import route_groups
from kvtier.kernels.sparse_decode import decode_num_splits, sparse_decode
from kvtier.kernels.sparse_prefill import sparse_prefill
from kvtier.layout import window_keys, windows_at
from kvtier.reference import hga as _ref
from kvtier.reference.hga import HGAStats, RouteCarry, RoutePlan, plan_widths
from kvtier.reference.summaries import routing_summaries_ref
from kvtier.rope import RopeSpec

__all__ = [
    "hga_attention", "BACKENDS", "KERNEL_CHUNK_SCORES", "KERNEL_GROUP_MERGES", "kernels_route", "kernel_refusal", "kernel_chunk_table", "num_running_terms", "prefill_tables",
]

#: Accepted values of ``backend``.
BACKENDS = ("auto", "triton", "reference")

# Positions routed and attended per kernel launch in a long prefill: bounds the routing
# candidates ([B, Hq, rows, tiles, Kc] int64) and the visibility table to tens of MiB.
_ROWS_PER_SLICE = 1024


def _interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (set by tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def hga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    rope_theta: float | None = None,
    rope: RopeSpec | None = None,
    start_pos: int | None = None,
    backend: str = "auto",
    route_carry: RouteCarry | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, HGAStats]:
    """Hierarchical Global Attention: routed exact attention over windows and chosen groups.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]`` float32, float16 or bfloat16
        Post-RoPE queries at positions ``start_pos .. start_pos + Lq - 1``.
    k, v : Tensor ``[B, Hkv, Lk, D]``, dtype and device of ``q``
        Post-RoPE keys and values at positions ``0 .. Lk - 1``, ``Lk >= start_pos + Lq``,
        ``Hq % Hkv == 0``. The Triton path needs the last dim of q, k and v contiguous
        (any other strides, e.g. a transposed ``[B, L, H, D]`` tensor, are fine).
    config : HGAConfig
    rope_theta : float, optional
        RoPE base of a model with plain RoPE (half-split pairs over the whole head).
    rope : RopeSpec, optional
        The model's RoPE (:func:`kvtier.rope.rope_spec_of`); exactly one of ``rope_theta``
        and ``rope`` is given. The summaries the kernels route over use its frequencies.
    start_pos : int, optional
        Position of the first query. None (the default) means ``Lk - Lq``: the queries are the
        context's last positions, as in a decode step ``hga_attention(q[:, :, -1:], k, v, ...)``
        or a prefill of the whole context.
    backend : {"auto", "triton", "reference"}
        "auto" runs the kernels on CUDA tensors and the reference otherwise; the other two
        force a path ("triton" on CPU tensors needs ``TRITON_INTERPRET=1``).
    route_carry : RouteCarry, optional
        For a ``running_*`` chunk score starting inside a chunk: ``stats.plan.carry`` of the
        call that ended at ``start_pos - 1`` (see :func:`kvtier.reference.hga_attention`).
        The kernels keep the maxima in float32: a carry is rounded to it on the way in and
        returned as float64 (exactly) on the way out.
    scale : float, optional
        Softmax scale; ``D ** -0.5`` when None (a model's ``scaling``, e.g. Gemma's, goes here).
    sinks : Tensor ``[Hq]``, optional
        Per-head sink logits (gpt-oss); reference backend only so far.
    softcap : float, optional
        Logit soft-capping (Gemma-2); reference backend only so far.

    Returns
    -------
    out : Tensor ``[B, Hq, Lq, D]`` in ``q.dtype``
    stats : HGAStats
        Keys attended per query, context lengths and the routing plan, equal to the
        reference's.

    Raises
    ------
    TypeError, ValueError
        On a wrong type, dtype, shape, device, stride, backend or an inconsistent length.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    start_pos = _ref.resolve_start_pos(q, k, start_pos)
    spec = _ref.check_hga_inputs(q, k, v, config, rope_theta, start_pos, rope=rope)
    scale = _ref.check_scale(scale, q.shape[-1])
    _ref.check_logit_options(sinks, softcap, q)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        return _ref.hga_attention(
            q, k, v, config=config, rope=spec, start_pos=start_pos, route_carry=route_carry, scale=scale,
            sinks=sinks, softcap=softcap,
        )
    if sinks is not None or softcap is not None:
        raise ValueError(
            "backend='triton': expected no sinks and no softcap (the kernels have neither sink logits nor "
            f"soft-capping so far), got sinks={'None' if sinks is None else 'a tensor'}, softcap={softcap!r}; "
            "use backend='reference'"
        )
    if not q.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton': expected CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}"
        )
    _check_kernel_options(config, "backend='triton'")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected a contiguous last dim for backend='triton', got strides {t.stride()}"
            )
    carry = _kernel_carry_in(config, start_pos, q, route_carry)
    return _hga_kernels(q, k, v, config, spec, start_pos, scale=scale, carry=carry)


#: chunk_score terms the routing kernels compute (``route_chunks``), alone or as an "a+b" split
#: of two: every term of ``HGAConfig``. A term without a kernel would be refused, never
#: replaced by another rule.
KERNEL_CHUNK_SCORES = CHUNK_SCORE_TERMS


#: group_merge rules the routing kernels compute (``route_groups``): every rule of ``HGAConfig``.
KERNEL_GROUP_MERGES = GROUP_MERGES


def kernels_route(config: HGAConfig) -> bool:
    """Whether the routing kernels compute every term of ``config.chunk_score`` and its
    ``group_merge`` (they compute every ``group_score``): the one test of the dispatch, the
    engine and ``kvtier.hf``."""
    return all(t in KERNEL_CHUNK_SCORES for t in config.chunk_score_terms) and config.group_merge in KERNEL_GROUP_MERGES


def kernel_refusal(config: HGAConfig) -> str:
    """What the routing kernels do not compute of ``config`` ("expected X, got Y"); "" when they compute it all."""
    if not all(t in KERNEL_CHUNK_SCORES for t in config.chunk_score_terms):
        return f"expected chunk_score terms in {KERNEL_CHUNK_SCORES}, got {config.chunk_score!r}"
    if config.group_merge not in KERNEL_GROUP_MERGES:
        return f"expected group_merge in {KERNEL_GROUP_MERGES}, got {config.group_merge!r}"
    return ""


def _check_kernel_options(config: HGAConfig, what: str) -> None:
    if not kernels_route(config):
        raise ValueError(f"{what}: {kernel_refusal(config)}; use backend='reference'")


def num_running_terms(config: HGAConfig) -> int:
    """Running-max terms of ``config.chunk_score``: the leading dim of the kernels' carry."""
    return sum(t.startswith("running_") for t in config.chunk_score_terms)


def kernel_chunk_table(
    term: str, config: HGAConfig, chunk_summ: torch.Tensor, group_summ: torch.Tensor, n: int
) -> tuple[torch.Tensor, dict[str, object]]:
    """What ``route_chunks`` scores for one term of ``config.chunk_score``, and its options.

    The first ``n`` chunk summaries ``[B, Hkv, n, D]`` for ``"sum"`` / ``"running_max"``; for
    the ``max_group`` terms the group-level keys ``[B, Hkv, n, M, Dg]`` (with ``bound=True``
    when they are min/max bounds; of ``"sum+bound"``'s ``[sum, min, max]`` rows, the view of
    the bounds: a chunk ranks by its best bounded group), with ``units=U``: the
    ``U = config.groups_per_max_group`` adjacent groups ``route_chunks`` merges into one unit
    as it reads them (``max_group_size``). The table is a view. Raises ValueError for a term
    the kernels do not compute.
    """
    _check_kernel_options(config, "config")
    if term not in config.chunk_score_terms:
        raise ValueError(f"term: expected one of {config.chunk_score_terms}, got {term!r}")
    if term.endswith("max_group"):
        d, per_unit = chunk_summ.shape[-1], config.groups_per_max_group
        if config.group_score == "sum+bound":
            table, layout = group_summ[:, :, :n, :, d:], "bound"
        else:
            table, layout = group_summ[:, :, :n], config.group_score
        return table, dict(score=term, bound=layout == "bound", units=per_unit)
    return chunk_summ[:, :, :n], dict(score=term)


def _kernel_carry_in(
    config: HGAConfig, start_pos: int, q: torch.Tensor, route_carry: RouteCarry | None
) -> torch.Tensor | None:
    """The kernels' carry ``[R, B, Hq, N]`` float32 (by chunk index) of a validated ``route_carry``.

    None without running terms; zeros at a chunk start (the kernels read no carry there). The
    kernels' scores are ``q . S`` and the reference's ``q . S / sqrt(D)``: the carry converts.
    """
    r = num_running_terms(config)
    if r == 0:
        return None
    c = config.chunk_size
    b, hq, lq, _ = q.shape
    win = windows_at(start_pos, c, config.sink_chunks, config.local_chunks)
    lb = min(lq, (start_pos // c + 1) * c - start_pos)  # positions of the first chunk
    prior = _ref._carry_in(config, win, start_pos, route_carry, (b, hq, lb))
    n = windows_at(start_pos + lq - 1, c, config.sink_chunks, config.local_chunks).local_start
    carry = torch.zeros(r, b, hq, n, dtype=torch.float32, device=q.device)
    if prior is not None:
        for j, t in enumerate(prior):
            carry[j, :, :, win.sink_end : win.local_start] = (t * math.sqrt(q.shape[-1])).to(q.device, torch.float32)
    return carry


def _kernel_carry_out(config: HGAConfig, last: int, carry: torch.Tensor, head_dim: int) -> RouteCarry:
    """The kernels' carry after position ``last`` as the reference's RouteCarry (float64, candidates only)."""
    win = windows_at(last, config.chunk_size, config.sink_chunks, config.local_chunks)
    if config.top_chunks == 0:  # nothing was ranked: the reference carries zeros
        carry = torch.zeros_like(carry)
    return RouteCarry(
        last + 1, tuple(t[:, :, win.sink_end : win.local_start].double() / math.sqrt(head_dim) for t in carry)
    )


def _fixed_keys(positions: torch.Tensor, config: HGAConfig) -> torch.Tensor:
    """Keys of the windows and the causal current chunk of each position ``[Lq]``."""
    return window_keys(positions, config.chunk_size, config.sink_chunks, config.local_chunks)


def prefill_tables(
    group_ids: torch.Tensor, start_pos: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables of :func:`kvtier.kernels.sparse_prefill` from per-query routed groups.

    Parameters
    ----------
    group_ids : Tensor ``[B, Hq, Lq, Kg]`` int64
        Attended global group ids per query (``RoutePlan.group_ids``), -1 padded.

    Returns
    -------
    routed : Tensor ``[B, Hq, NQB, U]`` int32
        Per query block (chunk), the sorted union of its queries' groups, -1 padded.
    num_routed : Tensor ``[B, Hq, NQB]`` int32
    visible : Tensor ``[B, Hq, Lq, U]`` uint8
        1 where the query attends that entry of its block's union.
    """
    b, hq, lq, kg = group_ids.shape
    dev = group_ids.device
    pos = torch.arange(start_pos, start_pos + lq, device=dev)
    qb = pos // chunk_size - start_pos // chunk_size
    nqb = (start_pos + lq - 1) // chunk_size - start_pos // chunk_size + 1
    if kg == 0:
        return (
            torch.full((b, hq, nqb, 1), -1, dtype=torch.int32, device=dev),
            torch.zeros(b, hq, nqb, dtype=torch.int32, device=dev),
            torch.zeros(b, hq, lq, 1, dtype=torch.uint8, device=dev),
        )
    big = 1 << 62
    padded = torch.full((b, hq, nqb, chunk_size, kg), big, dtype=torch.int64, device=dev)
    padded[:, :, qb, pos % chunk_size] = torch.where(group_ids < 0, big, group_ids)
    flat = padded.reshape(b, hq, nqb, chunk_size * kg).sort(dim=-1).values
    dup = torch.zeros_like(flat, dtype=torch.bool)
    dup[..., 1:] = flat[..., 1:] == flat[..., :-1]
    flat = torch.where(dup, big, flat).sort(dim=-1).values
    num = (flat < big).sum(dim=-1)
    u = max(1, int(num.max()))  # one host sync per prefill slice: sizes the tables
    table = flat[..., :u].contiguous()
    idx = torch.searchsorted(table[:, :, qb].contiguous(), group_ids.clamp(min=0).contiguous())
    vis = torch.zeros(b, hq, lq, u + 1, dtype=torch.uint8, device=dev)
    vis.scatter_(3, torch.where(group_ids >= 0, idx, u), 1)
    routed = torch.where(table >= big, -1, table).to(torch.int32)
    return routed, num.to(torch.int32), vis[..., :u]


def _route(
    q: torch.Tensor,
    chunk_summ: torch.Tensor,
    group_summ: torch.Tensor,
    start_pos: int,
    config: HGAConfig,
    widths: tuple[int, int, int],
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    precision: str = "tf32x3",
    carry: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> bool:
    """Fill the plan tensors ``out`` (chunk, group, fetch ids and the int32 routed table).

    Chunk scores use three tf32 tensor-core products ("tf32x3", about fp32 accurate): on the
    H200 a 64-query block at 1M tokens routes in 0.69 ms against 1.14 ms with IEEE fp32 dots,
    and the plans agree with the float64 reference on >= 99.5% of rows (gpu test).

    ``carry`` = ``(carry_in, carry_out)``, each ``[R, B, Hq, >= N]`` float32, for the R
    running terms of ``config.chunk_score`` (see ``route_chunks``). Returns whether the
    kernels ran (False: nothing to route, outputs and ``carry_out`` untouched).
    """
    lq = q.shape[2]
    w_last = windows_at(start_pos + lq - 1, config.chunk_size, config.sink_chunks, config.local_chunks)
    if widths[0] == 0 or w_last.num_candidates == 0:
        return False  # outputs were created -1 filled
    n = w_last.local_start  # chunks any row can pick lie below this
    rows = q.shape[1] // chunk_summ.shape[1] * lq
    # Many rows per KV head (prefill): 64-row blocks read each summary tile 4x less often than
    # 16-row blocks; narrower tiles keep the [64, block_t] fp32 scores in registers.
    block_r, warps = (64, 8) if rows >= 64 else (16, 4)
    bt, nt, kt = route_chunks_tiles(n, config.top_chunks)
    if block_r == 64 and bt > 128:  # noqa: PLR2004
        bt, nt, kt = route_chunks_tiles(n, config.top_chunks, block_t=128)
    cands = []
    running = 0
    for term in config.chunk_score_terms:  # one launch per term: a split ranks by two scores
        cand = torch.empty(q.shape[0], q.shape[1], lq, nt, kt, dtype=torch.int64, device=q.device)
        table, score_options = kernel_chunk_table(term, config, chunk_summ, group_summ, n)
        if term.startswith("running_"):
            assert carry is not None
            score_options.update(carry_in=carry[0][running], carry_out=carry[1][running])
            running += 1
        route_chunks(
            q,
            table,
            cand,
            start_pos=start_pos,
            chunk_size=config.chunk_size,
            sink_chunks=config.sink_chunks,
            local_chunks=config.local_chunks,
            block_t=bt,
            block_r=block_r,
            num_warps=warps,
            precision=precision,
            **score_options,  # type: ignore[arg-type]
        )
        cands.append(cand)
    route_groups(
        cands[0],
        q,
        group_summ,
        *out,
        top_chunks=config.top_chunks,
        top_groups=config.top_groups,
        fetch_groups=config.fetch_groups,
        group_score=config.group_score,
        group_merge=config.group_merge,
        group_reserve=config.group_reserve,
        cand2=cands[1] if len(cands) > 1 else None,
    )
    return True


def _hga_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: HGAConfig,
    rope: RopeSpec | float,
    start_pos: int,
    summaries: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    carry: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HGAStats]:
    """The kernel path; ``summaries`` (chunk, group) may be given when they are kept incrementally.

    ``rope`` is the model's RoPE, or a plain RoPE base. ``carry`` (running chunk scores):
    ``[R, B, Hq, N]`` float32 from :func:`_kernel_carry_in`; the plan returns it advanced.
    """
    b, hq, lq, d = q.shape
    c, g = config.chunk_size, config.group_size
    dev = q.device
    last = start_pos + lq - 1
    if carry is None and config.running_routing:  # as at a chunk start (an error inside one)
        carry = _kernel_carry_in(config, start_pos, q, None)
    n_closed = last // c
    if summaries is None:
        spec = rope if isinstance(rope, RopeSpec) else RopeSpec.plain(d, float(rope))
        chunk_summ, group_summ = routing_summaries_ref(k[:, :, : n_closed * c], config, spec)
    else:
        chunk_summ, group_summ = summaries
    widths = plan_widths(config, last)
    chunk_ids, group_ids, fetch_ids = (
        torch.full((b, hq, lq, w), -1, dtype=torch.int64, device=dev) for w in widths
    )
    routed = torch.full((b, hq, lq, widths[1]), -1, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    geo = dict(chunk_size=c, group_size=g, sink_chunks=config.sink_chunks, local_chunks=config.local_chunks)

    # Slices start on chunk boundaries so that a query block is never split between launches
    # (when C divides the slice length; else a running score's carry crosses the cut). A
    # slice's carry goes to a second buffer: its programs of different chunks run in any order.
    carry_next = None if carry is None else torch.zeros_like(carry)
    s0 = start_pos
    while s0 <= last:
        s1 = min(last + 1, (s0 // c) * c + _ROWS_PER_SLICE)
        rows = slice(s0 - start_pos, s1 - start_pos)
        sl = tuple(t[:, :, rows] for t in (chunk_ids, group_ids, fetch_ids, routed))
        pair = None if carry is None or carry_next is None else (carry, carry_next)
        ran = _route(q[:, :, rows], chunk_summ, group_summ, s0, config, widths, sl, carry=pair)
        if ran and carry is not None and carry_next is not None:
            carry, carry_next = carry_next, carry
        if s1 - s0 == 1:
            positions = torch.full((b,), s0, dtype=torch.int32, device=dev)
            max_keys = (config.sink_chunks + config.local_chunks + 1) * c + widths[1] * g
            splits = decode_num_splits(b, hq, max_keys)
            ws = torch.empty(b, hq, splits, d + 2, dtype=torch.float32, device=dev)
            sparse_decode(
                q[:, :, s0 - start_pos], k, v, positions, sl[3][:, :, 0], out[:, :, s0 - start_pos], ws,
                scale=scale, **geo
            )
        else:
            tab, num, vis = prefill_tables(sl[1], s0, c)
            sparse_prefill(q[:, :, rows], k, v, tab, num, vis, out[:, :, rows], start_pos=s0, scale=scale, **geo)
        s0 = s1

    positions = torch.arange(start_pos, last + 1, device=dev)
    keys = _fixed_keys(positions, config)[None, None, :] + g * (group_ids >= 0).sum(dim=-1)
    out_carry = None if carry is None else _kernel_carry_out(config, last, carry, d)
    return out, HGAStats(keys, positions + 1, RoutePlan(chunk_ids, group_ids, fetch_ids, out_carry))
