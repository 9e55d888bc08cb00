"""Rotary position embedding in the half-split (``rotate_half``) convention, applied and inverted.

Frequency pair i rotates dims ``(i, i + D/2)`` by ``position * inv_freq[i]`` with
``inv_freq[i] = theta ** (-i / (D/2))``, as Llama, Mistral and Qwen do in transformers.
Angles, cosines and the rotation itself are computed in float64 so that
``invert_rope(apply_rope(x, p), p)`` returns ``x`` to within float64 rounding before the
cast back to the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["rope_inv_freq", "apply_rope", "invert_rope", "rotate_half"]


def rope_inv_freq(head_dim: int, theta: float, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies ``[D/2]`` (float64) of plain RoPE with base ``theta``."""
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim: expected an even number, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"rope_theta: expected a positive number, got {theta}")
    i = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    return float(theta) ** (-i / (head_dim // 2))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: float) -> torch.Tensor:
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [L, D/2]
    angles = torch.cat((angles, angles), dim=-1) * sign  # [L, D]
    x64 = x.to(torch.float64)
    out = x64 * angles.cos() + rotate_half(x64) * angles.sin()
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., L, D]`` to absolute ``positions [L]``.

    Parameters
    ----------
    x : Tensor ``[..., L, D]``
        Vectors before RoPE, any float dtype.
    positions : Tensor ``[L]``
        Absolute positions (int or float).
    inv_freq : Tensor ``[D/2]``
        From :func:`rope_inv_freq`.
    """
    return _rotate(x, positions, inv_freq, 1.0)


def invert_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_rope`: recover pre-RoPE vectors from post-RoPE ``x [..., L, D]``."""
    return _rotate(x, positions, inv_freq, -1.0)
