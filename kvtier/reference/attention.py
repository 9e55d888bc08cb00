"""Dense causal attention with GQA, and exact attention under an explicit visibility mask.

Both compute in float32 (scores, softmax and P @ V) and return the input dtype. These are
the baselines every HGA path is compared with.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dense_attention_ref", "masked_attention_ref", "expand_kv_heads"]


def expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """``[B, Hkv, L, D] -> [B, Hq, L, D]``: query head h reads KV head ``h // (Hq // Hkv)``."""
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)


def masked_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    *,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to ``visible`` keys, in float32.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]``
    k, v : Tensor ``[B, Hkv, Lk, D]``
    visible : bool Tensor broadcastable to ``[B, Hq, Lq, Lk]``
        Every query row must see at least one key.
    scale : float, optional
        Defaults to ``D ** -0.5``.
    sinks : Tensor ``[Hq]``, optional
        Per-head sink logits (gpt-oss): one more softmax entry per row, carrying no value.
    softcap : float, optional
        Logits become ``softcap * tanh(logits / softcap)`` before masking (Gemma-2).

    Returns
    -------
    Tensor ``[B, Hq, Lq, D]`` in ``q.dtype``.
    """
    hq = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = expand_kv_heads(k.float(), hq)
    vf = expand_kv_heads(v.float(), hq)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, hq, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        return torch.matmul(probs, vf).to(q.dtype)
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)


def dense_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start_pos: int = 0, scale: float | None = None
) -> torch.Tensor:
    """Dense causal attention: query i (at position ``start_pos + i``) sees keys ``0 .. start_pos + i``.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]``
    k, v : Tensor ``[B, Hkv, Lk, D]`` with ``Lk >= start_pos + Lq``
    """
    lq, lk = q.shape[2], k.shape[2]
    qpos = torch.arange(start_pos, start_pos + lq, device=q.device)
    kpos = torch.arange(lk, device=q.device)
    visible = kpos[None, :] <= qpos[:, None]
    return masked_attention_ref(q, k, v, visible, scale=scale)
