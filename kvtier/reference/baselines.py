"""Sparse-attention baselines HGA is measured beside: Quest page selection and oracle top-k.

Both are slow, plain torch references with HGA's accounting, so that "the same budget"
means the same number of keys per query:

* every query attends the sink chunks, the local window and the causal part of its own
  chunk exactly as HGA does (:func:`kvtier.layout.windows_at`);
* on top of that it picks ``routed_keys`` keys among the candidate chunks (the closed chunks
  between the sinks and the local window), per batch element, query head and position:
  Quest by ``routed_keys // page_size`` whole pages ranked by an upper bound of ``q . k``,
  the oracle by the true top ``routed_keys`` of ``q . k``.

With HGA's defaults (1 sink and 2 local chunks of 64 tokens, 60 groups of 16) the budget is
``routed_keys = 960`` and every method attends at most 64 + 128 + 64 + 960 = 1,216 keys per
query (the paper's 2 sink and 8 local chunks and 32 groups: 128 + 512 + 64 + 512, as many). Selection looks only at keys before the query's chunk, so all of it is causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier._checks import check_positive_int, check_tensor
from kvtier.config import HGAConfig
from kvtier.layout import SUPPORTED_DTYPES, windows_at
from kvtier.reference.attention import expand_kv_heads, masked_attention_ref

__all__ = ["SparseStats", "quest_attention_ref", "oracle_attention_ref", "quest_bounds_ref", "routed_keys_for_budget"]


@dataclass
class SparseStats:
    """What one baseline call attended (same fields as :class:`kvtier.reference.hga.HGAStats`).

    Attributes
    ----------
    keys_per_query : Tensor ``[B, Hq, Lq]`` int64
    context_per_query : Tensor ``[Lq]`` int64
        Keys dense causal attention would use (position + 1).
    """

    keys_per_query: torch.Tensor
    context_per_query: torch.Tensor

    @property
    def mean_keys_per_query(self) -> float:
        """Keys attended per query, averaged over batch, heads and positions."""
        return float(self.keys_per_query.double().mean())

    @property
    def density(self) -> float:
        """Mean over queries of keys attended / causal context length."""
        return float((self.keys_per_query.double() / self.context_per_query.double()).mean())


def routed_keys_for_budget(config: HGAConfig, budget: int) -> int:
    """Keys left for selection when ``budget`` keys per query include sinks, local window and a full chunk.

    Parameters
    ----------
    config : HGAConfig
        Gives the window sizes.
    budget : int
        Keys per query, everything counted.

    Raises
    ------
    ValueError
        If the budget does not even cover the fixed windows.
    """
    check_positive_int("budget", budget)
    fixed = (config.sink_chunks + config.local_chunks + 1) * config.chunk_size
    if budget < fixed:
        raise ValueError(f"budget: expected at least the windows' {fixed} keys per query, got {budget}")
    return budget - fixed


def _check(q: object, k: object, v: object, config: object, routed_keys: object, start_pos: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=SUPPORTED_DTYPES)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if not isinstance(config, HGAConfig):
        raise TypeError(f"config: expected an HGAConfig, got {type(config).__name__}")
    check_positive_int("routed_keys", routed_keys, minimum=0)
    check_positive_int("start_pos", start_pos, minimum=0)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k, v: expected [B={q.shape[0]}, Hkv, Lk, D={q.shape[3]}] each, got {list(k.shape)}, {list(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k: expected a number of KV heads dividing {q.shape[1]}, got {k.shape[1]}")
    if k.shape[2] < start_pos + q.shape[2]:  # type: ignore[operator]
        raise ValueError(f"k: expected at least start_pos + Lq = {start_pos + q.shape[2]} positions, got {k.shape[2]}")  # type: ignore[operator]


def _blocks(start_pos: int, lq: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(first, last)`` positions of the query blocks that share a chunk."""
    out, pos, last = [], start_pos, start_pos + lq - 1
    while pos <= last:
        end = min(last, (pos // chunk_size + 1) * chunk_size - 1)
        out.append((pos, end))
        pos = end + 1
    return out


def _run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: HGAConfig, start_pos: int, select: object
) -> tuple[torch.Tensor, SparseStats]:
    """Block loop shared by both baselines; ``select(q_blk, lo, hi)`` -> bool ``[B, Hq, Lb, hi - lo]``."""
    c = config.chunk_size
    b, hq, lq, _ = q.shape
    out = torch.empty_like(q)
    keys = torch.empty(b, hq, lq, dtype=torch.long, device=q.device)
    for first, last in _blocks(start_pos, lq, c):
        win = windows_at(first, c, config.sink_chunks, config.local_chunks)
        rows = slice(first - start_pos, last - start_pos + 1)
        kpos = torch.arange(last + 1, device=q.device)
        qpos = torch.arange(first, last + 1, device=q.device)
        fixed = (kpos < win.sink_end * c) | ((kpos >= win.local_start * c) & (kpos < win.current * c))
        own = (kpos[None, :] >= win.current * c) & (kpos[None, :] <= qpos[:, None])
        visible = (fixed[None, :] | own).expand(b, hq, -1, -1).clone()
        lo, hi = win.sink_end * c, win.local_start * c
        if hi > lo:
            visible[..., lo:hi] = select(q[:, :, rows].float(), lo, hi)  # type: ignore[operator]
        out[:, :, rows] = masked_attention_ref(q[:, :, rows], k[:, :, : last + 1], v[:, :, : last + 1], visible)
        keys[:, :, rows] = visible.sum(dim=-1)
    context = torch.arange(start_pos + 1, start_pos + lq + 1, device=q.device)
    return out, SparseStats(keys, context)


def quest_bounds_ref(q: torch.Tensor, k: torch.Tensor, page_size: int) -> torch.Tensor:
    """Quest's page scores: ``sum_i max(q_i * min_i, q_i * max_i)``, an upper bound of ``q . k`` over each page.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]``
    k : Tensor ``[B, Hkv, P * page_size, D]``
        The keys of P whole pages.

    Returns
    -------
    Tensor ``[B, Hq, Lq, P]`` float32 (unscaled).
    """
    b, hkv, n, d = k.shape
    pages = k.float().reshape(b, hkv, n // page_size, page_size, d)
    kmin = expand_kv_heads(pages.amin(dim=3), q.shape[1])  # [B, Hq, P, D]
    kmax = expand_kv_heads(pages.amax(dim=3), q.shape[1])
    qf = q.float()
    # max(q*mn, q*mx) is q*mx where q >= 0 and q*mn where q < 0: two matmuls.
    return torch.matmul(qf.clamp(min=0), kmax.transpose(-1, -2)) + torch.matmul(qf.clamp(max=0), kmin.transpose(-1, -2))


def quest_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    routed_keys: int,
    page_size: int = 16,
    start_pos: int = 0,
) -> tuple[torch.Tensor, SparseStats]:
    """Quest: per page of ``page_size`` keys, the elementwise min and max bound ``q . k`` from above.

    A page's score for query q is ``sum_i max(q_i * min_i, q_i * max_i)``; each query and head
    attends its top ``routed_keys // page_size`` candidate pages besides HGA's windows.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]``
        Post-RoPE queries at positions ``start_pos ..``.
    k, v : Tensor ``[B, Hkv, Lk, D]``, ``Lk >= start_pos + Lq``
    config : HGAConfig
        Chunk size, sink and local windows (its routing budgets are not used).
    routed_keys : int
        Keys per query beyond the windows (see :func:`routed_keys_for_budget`).
    page_size : int
        Must divide ``config.chunk_size``. Default 16 (Quest's page).
    start_pos : int

    Returns
    -------
    out : Tensor ``[B, Hq, Lq, D]`` in ``q.dtype``
    stats : SparseStats
    """
    _check(q, k, v, config, routed_keys, start_pos)
    check_positive_int("page_size", page_size)
    if config.chunk_size % page_size != 0:
        raise ValueError(f"page_size: expected a divisor of chunk_size={config.chunk_size}, got {page_size}")
    num_pages = routed_keys // page_size

    def select(qb: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        bound = quest_bounds_ref(qb, k[:, :, lo:hi], page_size)
        top = min(num_pages, bound.shape[-1])
        chosen = torch.zeros_like(bound, dtype=torch.bool)
        if top > 0:
            chosen.scatter_(-1, torch.topk(bound, top, dim=-1).indices, True)
        return chosen.repeat_interleave(page_size, dim=-1)

    return _run(q, k, v, config, start_pos, select)


def oracle_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: HGAConfig,
    routed_keys: int,
    start_pos: int = 0,
) -> tuple[torch.Tensor, SparseStats]:
    """Oracle top-k: each query and head attends the ``routed_keys`` candidate keys with the largest ``q . k``.

    Same parameters and result as :func:`quest_attention_ref` (without ``page_size``). Of all
    selections of ``routed_keys`` keys with the same windows it keeps the most softmax mass
    per query and head. That is not the lowest NLL: at SmolLM2's 8K, HGA with groups of 8, or
    with its defaults (2 local chunks and 48 first-level chunks), is closer to dense
    (docs/fidelity.md).
    """
    _check(q, k, v, config, routed_keys, start_pos)
    hq = q.shape[1]

    def select(qb: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        scores = torch.matmul(qb, expand_kv_heads(k[:, :, lo:hi].float(), hq).transpose(-1, -2))
        top = min(routed_keys, hi - lo)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if top > 0:
            chosen.scatter_(-1, torch.topk(scores, top, dim=-1).indices, True)
        return chosen

    return _run(q, k, v, config, start_pos, select)
