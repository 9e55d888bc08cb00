"""Mixed-RoPE chunk and group summaries (the routing keys of HGA), computed plainly.

A unit (a chunk or a group) of tokens at positions ``p_0 .. p_{n-1}`` with post-RoPE keys
``k_t`` is summarised per RoPE frequency pair i in one of two ways:

* token-wise, for fast pairs: ``sum_t k_t`` (each token rotated at its own position), so
  ``q . summary`` is exactly the sum of the tokens' logits in those dims;
* anchored, for slow pairs: ``RoPE(sum_t RoPE^-1(k_t, p_t), p_anchor)``, the pre-RoPE sum
  rotated at the unit's middle position ``p_anchor = p_0 + (n - 1) // 2``; the phase of a
  slow pair barely turns inside a chunk, and rotating once keeps the sum coherent.

Pair i is fast when ``(C - 1) * inv_freq[i] > cutoff`` with C the *chunk* size, for group
summaries too (the authors' rule; at theta 1e4, D 64, C 64 that is 17 of 32 pairs), with
the pair's real frequency (:class:`kvtier.rope.RopeSpec`: llama3, YaRN, longrope, ... scale
each pair differently). Dims past the rotary dim carry no position and are summed plainly.
The sums are not scaled: a common scale does not change any top-k among units of equal
size, and summaries never enter the softmax in kvtier.

With ``HGAConfig.group_score == "bound"`` the group-level routing keys are instead the
elementwise minimum and maximum of each group's post-RoPE keys (:func:`group_bounds_ref`),
laid out as ``[min, max]`` along a last dim of 2D, so that the bound
``sum_i max(q_i min_i, q_i max_i)`` is the plain dot product of ``[min(q, 0), max(q, 0)]``
with it. ``"sum+bound"`` routes by both: its group keys are ``[sum, min, max]`` (3D).
:func:`routing_summaries_ref` gives whichever a configuration routes by.
"""

from __future__ import annotations

import torch

from typing import TYPE_CHECKING

from kvtier.reference.rope import apply_rope, as_rope_spec, invert_rope
from kvtier.rope import RopeSpec

if TYPE_CHECKING:
    from kvtier.config import HGAConfig

__all__ = [
    "tokenwise_pairs",
    "unit_summaries_ref",
    "chunk_summaries_ref",
    "group_summaries_ref",
    "group_bounds_ref",
    "routing_summaries_ref",
    "merged_group_keys_ref",
]


def tokenwise_pairs(inv_freq: RopeSpec | torch.Tensor, chunk_size: int, cutoff_rad: float) -> torch.Tensor:
    """Bool ``[R/2]``: True for the pairs summarised token-wise (phase turns > cutoff in a chunk)."""
    freq = inv_freq.inv_freq if isinstance(inv_freq, RopeSpec) else inv_freq
    return (chunk_size - 1) * freq > cutoff_rad


def unit_summaries_ref(
    k: torch.Tensor, unit_size: int, inv_freq: RopeSpec | torch.Tensor, tokenwise: torch.Tensor, *, start: int = 0
) -> torch.Tensor:
    """Summaries of consecutive units of ``unit_size`` tokens, the first at position ``start``.

    Parameters
    ----------
    k : Tensor ``[B, Hkv, N * unit_size, D]``
        Post-RoPE keys at positions ``start .. start + N * unit_size - 1``.
    unit_size : int
        Tokens per unit (chunk size or group size).
    inv_freq : RopeSpec, or Tensor ``[D/2]`` (plain half-split RoPE)
    tokenwise : bool Tensor ``[R/2]``
        From :func:`tokenwise_pairs`.

    Returns
    -------
    Tensor ``[B, Hkv, N, D]`` float32.
    """
    b, h, length, d = k.shape
    assert length % unit_size == 0, "only whole units are summarised"
    n = length // unit_size
    spec = as_rope_spec(inv_freq, d)
    positions = torch.arange(start, start + length, device=k.device)
    k_raw = invert_rope(k.to(torch.float64), positions, spec)
    tokenwise_sum = k.to(torch.float64).reshape(b, h, n, unit_size, d).sum(dim=3)
    raw_sum = k_raw.reshape(b, h, n, unit_size, d).sum(dim=3)
    anchors = start + torch.arange(n, device=k.device) * unit_size + (unit_size - 1) // 2
    anchored = apply_rope(raw_sum, anchors, spec)
    use_tokenwise = spec.pair_to_dims(tokenwise.cpu(), True).to(k.device)  # position-free dims: plain sums
    return torch.where(use_tokenwise, tokenwise_sum, anchored).to(torch.float32)


def chunk_summaries_ref(
    k: torch.Tensor, chunk_size: int, inv_freq: RopeSpec | torch.Tensor, cutoff_rad: float, *, start: int = 0
) -> torch.Tensor:
    """Chunk summaries ``[B, Hkv, N, D]`` of the N whole chunks of ``k [B, Hkv, >= N*C, D]``.

    ``k[:, :, 0]`` is at absolute position ``start`` (a multiple of the chunk size).
    """
    n = k.shape[2] // chunk_size
    tokenwise = tokenwise_pairs(inv_freq, chunk_size, cutoff_rad)
    return unit_summaries_ref(k[:, :, : n * chunk_size], chunk_size, inv_freq, tokenwise, start=start)


def group_summaries_ref(
    k: torch.Tensor, chunk_size: int, group_size: int, inv_freq: RopeSpec | torch.Tensor, cutoff_rad: float,
    *, start: int = 0,
) -> torch.Tensor:
    """Group summaries ``[B, Hkv, N, M, D]`` of the N whole chunks of ``k``, M groups each.

    ``k[:, :, 0]`` is at absolute position ``start`` (a multiple of the chunk size).
    """
    b, h, _, d = k.shape
    n = k.shape[2] // chunk_size
    tokenwise = tokenwise_pairs(inv_freq, chunk_size, cutoff_rad)
    s = unit_summaries_ref(k[:, :, : n * chunk_size], group_size, inv_freq, tokenwise, start=start)
    return s.reshape(b, h, n, chunk_size // group_size, d)


def group_bounds_ref(k: torch.Tensor, chunk_size: int, group_size: int) -> torch.Tensor:
    """Elementwise min and max of each group's keys, ``[B, Hkv, N, M, 2D]`` float32 (min first).

    ``k [B, Hkv, >= N*C, D]`` holds post-RoPE keys; only its N whole chunks are used. No RoPE
    handling is needed: the bound is over the keys as the query sees them.
    """
    b, h, _, d = k.shape
    n = k.shape[2] // chunk_size
    units = k[:, :, : n * chunk_size].float().reshape(b, h, n, chunk_size // group_size, group_size, d)
    return torch.cat((units.amin(dim=4), units.amax(dim=4)), dim=-1)


def routing_summaries_ref(
    k: torch.Tensor, config: HGAConfig, inv_freq: RopeSpec | torch.Tensor, *, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing keys ``config`` scores: chunk summaries and group-level keys of k's whole chunks.

    Parameters
    ----------
    k : Tensor ``[B, Hkv, >= N*C, D]``
        Post-RoPE keys; ``k[:, :, 0]`` is at absolute position ``start`` (a chunk boundary).
    config : HGAConfig
    inv_freq : RopeSpec, or Tensor ``[D/2]`` (plain half-split RoPE)

    Returns
    -------
    chunk_summ : Tensor ``[B, Hkv, N, D]`` float32
        Mixed-RoPE chunk summaries (scored by the ``"sum"`` and ``"running_max"`` chunk terms).
    group_summ : Tensor ``[B, Hkv, N, M, Dg]`` float32, ``Dg = config.group_key_dim(D)``
        Mixed-RoPE group summaries (``"sum"``), the groups' ``[min, max]`` key bounds
        (``"bound"``), or both, ``[sum, min, max]`` (``"sum+bound"``).
    """
    c = config.chunk_size
    chunk_summ = chunk_summaries_ref(k, c, inv_freq, config.rope_cutoff_rad, start=start)
    parts = []
    if "sum" in config.group_score_terms:
        parts.append(group_summaries_ref(k, c, config.group_size, inv_freq, config.rope_cutoff_rad, start=start))
    if "bound" in config.group_score_terms:
        parts.append(group_bounds_ref(k, c, config.group_size))
    return chunk_summ, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def merged_group_keys_ref(group_keys: torch.Tensor, group_score: str, head_dim: int, per_unit: int) -> torch.Tensor:
    """Group-level routing keys ``[..., M, Dg]`` merged into units of ``per_unit`` adjacent groups.

    What a ``max_group`` chunk term scores with ``HGAConfig.max_group_size``: the minima of a
    unit are its groups' min, the maxima their max (exactly the bounds of the unit's keys) and
    the sums add (each group's summary keeps its own anchor). ``group_score`` names the layout
    of the last dim (``"sum"``: D, ``"bound"``: ``[min, max]``, ``"sum+bound"``: ``[sum, min,
    max]``). Returns ``[..., M // per_unit, Dg]`` in the input's dtype; ``per_unit == 1``
    returns the input.
    """
    if per_unit == 1:
        return group_keys
    *lead, m, dg = group_keys.shape
    if m % per_unit:
        raise ValueError(f"per_unit: expected a divisor of the {m} groups per chunk, got {per_unit}")
    g = group_keys.reshape(*lead, m // per_unit, per_unit, dg)
    d = head_dim
    if group_score == "sum":
        parts = [g.sum(-2)]
    elif group_score == "bound":
        parts = [g[..., :d].amin(-2), g[..., d:].amax(-2)]
    elif group_score == "sum+bound":
        parts = [g[..., :d].sum(-2), g[..., d : 2 * d].amin(-2), g[..., 2 * d :].amax(-2)]
    else:
        raise ValueError(f"group_score: expected 'sum', 'bound' or 'sum+bound', got {group_score!r}")
    return torch.cat(parts, dim=-1)
