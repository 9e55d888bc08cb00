"""Rotary position embedding applied and inverted, as a :class:`kvtier.rope.RopeSpec` describes it.

Pair i rotates its two dims (``(i, i + R/2)`` half-split, or ``(2i, 2i + 1)`` interleaved)
by ``position * inv_freq[i]`` and multiplies it by the spec's ``attention_scaling`` (as
transformers multiplies cos and sin); dims past the rotary dim R are left as they are.
A bare ``inv_freq [D/2]`` tensor stands for unscaled half-split RoPE over the whole head.
Angles, cosines and the rotation are computed in float64 so that
``invert_rope(apply_rope(x, p), p)`` returns ``x`` to within float64 rounding before the
cast back to the input dtype.
"""

from __future__ import annotations

import torch

from kvtier.rope import RopeSpec

__all__ = ["rope_inv_freq", "as_rope_spec", "apply_rope", "invert_rope", "rotate_half"]


def rope_inv_freq(head_dim: int, theta: float, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies ``[D/2]`` (float64) of plain RoPE with base ``theta``."""
    return RopeSpec.plain(head_dim, theta).inv_freq.to(device)


def as_rope_spec(rope: RopeSpec | torch.Tensor, head_dim: int) -> RopeSpec:
    """``rope`` itself, or plain half-split RoPE over ``head_dim`` dims with frequencies ``rope [D/2]``."""
    if isinstance(rope, RopeSpec):
        if rope.head_dim != head_dim:
            raise ValueError(f"rope: expected a spec for head dim {head_dim}, got head_dim={rope.head_dim}")
        return rope
    if not isinstance(rope, torch.Tensor) or rope.dim() != 1 or 2 * rope.numel() != head_dim:
        raise ValueError(
            f"rope: expected a RopeSpec or an inv_freq tensor [{head_dim // 2}], got "
            f"{list(rope.shape) if isinstance(rope, torch.Tensor) else type(rope).__name__}"
        )
    return RopeSpec(head_dim, rope)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, positions: torch.Tensor, rope: RopeSpec | torch.Tensor, sign: float) -> torch.Tensor:
    spec = as_rope_spec(rope, x.shape[-1])
    freq = spec.dim_freq(x.device)  # [D], 0 on position-free dims
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * freq[None, :] * sign  # [L, D]
    x64 = x.to(torch.float64)
    out = x64 * angles.cos() + spec.partner(x64) * angles.sin()
    # transformers scales cos and sin, so the magnitude factor reaches the rotated dims only
    mag = spec.pair_to_dims(torch.full((spec.rotary_dim // 2,), spec.attention_scaling, dtype=torch.float64), 1.0)
    out = out * mag.to(x.device) if sign > 0 else out / mag.to(x.device)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: RopeSpec | torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., L, D]`` to absolute ``positions [L]``, as the model does.

    Parameters
    ----------
    x : Tensor ``[..., L, D]``
        Vectors before RoPE, any float dtype.
    positions : Tensor ``[L]``
        Absolute positions (int or float).
    inv_freq : RopeSpec, or Tensor ``[D/2]``
        The model's RoPE (:func:`kvtier.rope.rope_spec_of`), or plain frequencies from
        :func:`rope_inv_freq`.
    """
    return _rotate(x, positions, inv_freq, 1.0)


def invert_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: RopeSpec | torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_rope`: recover pre-RoPE vectors from post-RoPE ``x [..., L, D]``."""
    return _rotate(x, positions, inv_freq, -1.0)
