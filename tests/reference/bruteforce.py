"""An independent, scalar-loop HGA used only to check the reference (no shared code with it)."""

from __future__ import annotations

import math

import torch


def half_pairs(head_dim: int, rotary_dim: int | None = None) -> list[tuple[int, int]]:
    """Dims (i, i + R/2) of the first R dims: the rotate_half convention."""
    half = (rotary_dim or head_dim) // 2
    return [(i, i + half) for i in range(half)]


def interleaved_pairs(rotary_dim: int) -> list[tuple[int, int]]:
    """Dims (2i, 2i + 1): GLM's convention."""
    return [(2 * i, 2 * i + 1) for i in range(rotary_dim // 2)]


def rotate_pair(x: torch.Tensor, pos: float, inv_freq: list[float], pairs: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Rotate each pair ``pairs[i]`` (default (i, i + D/2)) of the vector x [D] by pos * inv_freq[i], in float64.

    Dims in no pair are left as they are.
    """
    pairs = half_pairs(x.shape[0]) if pairs is None else pairs
    out = x.clone().double()
    for i, (ia, ib) in enumerate(pairs):
        a, b = float(x[ia]), float(x[ib])
        c, s = math.cos(pos * inv_freq[i]), math.sin(pos * inv_freq[i])
        out[ia], out[ib] = a * c - b * s, a * s + b * c
    return out


def inv_freqs(head_dim: int, theta: float) -> list[float]:
    half = head_dim // 2
    return [theta ** (-i / half) for i in range(half)]


def unit_summary(
    keys: torch.Tensor, first_pos: int, chunk_size: int, inv_freq: list[float], cutoff: float,
    pairs: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Mixed-RoPE summary of one unit: keys [n, D] post-RoPE at positions first_pos...."""
    n, d = keys.shape
    pairs = half_pairs(d) if pairs is None else pairs
    tokenwise = keys.double().sum(0)
    raw = sum(rotate_pair(keys[t], -(first_pos + t), inv_freq, pairs) for t in range(n))
    anchored = rotate_pair(raw, first_pos + (n - 1) // 2, inv_freq, pairs)
    out = anchored.clone()
    for i, (ia, ib) in enumerate(pairs):
        if (chunk_size - 1) * inv_freq[i] > cutoff:
            out[ia], out[ib] = tokenwise[ia], tokenwise[ib]
    return out


def hga_bruteforce(q, k, v, *, cfg, theta=None, start_pos=0, freqs=None, pairs=None):
    """Loops over batch, head and position. Returns (out fp64 [B,Hq,Lq,D], group sets, key counts).

    RoPE: plain of base ``theta``, or frequencies ``freqs`` over dim ``pairs``.
    """
    b_, hq, lq, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    c, g = cfg.chunk_size, cfg.group_size
    m = c // g
    freqs = inv_freqs(d, theta) if freqs is None else freqs
    out = torch.zeros(b_, hq, lq, d, dtype=torch.float64)
    groups_chosen = {}
    counts = torch.zeros(b_, hq, lq, dtype=torch.long)
    summ_cache = {}

    def summ(b, kvh, first, n):
        key = (b, kvh, first, n)
        if key not in summ_cache:
            summ_cache[key] = unit_summary(k[b, kvh, first : first + n], first, c, freqs, cfg.rope_cutoff_rad, pairs)
        return summ_cache[key]

    for b in range(b_):
        for h in range(hq):
            kvh = h // rep
            for i in range(lq):
                t = start_pos + i
                cur = t // c
                sink_end = min(cfg.sink_chunks, cur)
                local_start = max(sink_end, cur - cfg.local_chunks)
                qv = q[b, h, i].double()
                cands = list(range(sink_end, local_start))

                gterms = cfg.group_score.split("+")

                def gscore(qvec, gi, kind=gterms[-1]):
                    if kind == "bound":  # Quest: the largest q . x over the group's box
                        keys = k[b, kvh, gi * g : (gi + 1) * g].double()
                        lo, hi = keys.min(0).values, keys.max(0).values
                        return sum(max(float(qvec[e]) * float(lo[e]), float(qvec[e]) * float(hi[e])) for e in range(d))
                    return float(qvec @ summ(b, kvh, gi * g, g))

                def term_score(term, j):
                    base = term.removeprefix("running_")
                    # running: every query of t's own chunk at positions <= t (start_pos is a chunk start here)
                    queries = [q[b, h, s_ - start_pos].double() for s_ in range(cur * c, t + 1)] if base != term else [qv]
                    if base == "sum":
                        return max(float(qs @ summ(b, kvh, j * c, c)) for qs in queries)
                    return max(gscore(qs, j * m + x) for qs in queries for x in range(m))

                terms = cfg.chunk_score.split("+")
                kc = min(cfg.top_chunks, len(cands))
                k1 = kc if len(terms) == 1 else -(-kc // 2)
                chunks = sorted(cands, key=lambda j: (-term_score(terms[0], j), j))[:k1]
                if len(terms) == 2:
                    rest = [j for j in cands if j not in chunks]
                    chunks += sorted(rest, key=lambda j: (-term_score(terms[1], j), j))[: kc - k1]
                gids = [j * m + x for j in chunks for x in range(m)]
                kg = min(cfg.top_groups, len(gids))
                k1 = kg if len(gterms) == 1 else -(-kg // 2)
                chosen = sorted(gids, key=lambda gi: (-gscore(qv, gi, gterms[0]), gi))[:k1]
                if len(gterms) == 2 and cfg.group_merge == "rank":
                    # r by the sum, r by the bound, then least rank sum, lesser rank, candidate
                    place = {gi: n for n, gi in enumerate(gids)}
                    ranks = [{gi: r for r, gi in enumerate(sorted(gids, key=lambda gi: (-gscore(qv, gi, t), gi)))}
                             for t in gterms]
                    r = min(cfg.group_reserve, kg // 2)
                    chosen = sorted(gids, key=lambda gi: ranks[0][gi])[:r]
                    chosen += sorted((gi for gi in gids if gi not in chosen), key=lambda gi: ranks[1][gi])[:r]
                    chosen += sorted((gi for gi in gids if gi not in chosen),
                                     key=lambda gi: (ranks[0][gi] + ranks[1][gi], min(ranks[0][gi], ranks[1][gi]),
                                                     place[gi]))[: kg - 2 * r]
                elif len(gterms) == 2:  # the rest by the bound among the groups left
                    rest = [gi for gi in gids if gi not in chosen]
                    chosen += sorted(rest, key=lambda gi: (-gscore(qv, gi, gterms[1]), gi))[: kg - k1]
                groups_chosen[(b, h, i)] = set(chosen)
                visible = set(range(sink_end * c)) | set(range(local_start * c, t + 1))
                for gi in chosen:
                    visible |= set(range(gi * g, (gi + 1) * g))
                idx = sorted(visible)
                counts[b, h, i] = len(idx)
                kk = k[b, kvh, idx].double()
                vv = v[b, kvh, idx].double()
                w = torch.softmax(kk @ qv / math.sqrt(d), dim=0)
                out[b, h, i] = w @ vv
    return out, groups_chosen, counts
