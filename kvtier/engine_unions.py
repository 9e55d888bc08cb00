"""Sorted unions of routed group ids, the order in which a block gathers its groups (both engine flows)."""

from __future__ import annotations

import torch

_BIG = 1 << 62  # padding of sorted id rows (sorts after every real id)


def _union(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sorted distinct ids of each row of ``ids [..., n]`` (-1 = none): ``([..., U], U)``, ``_BIG`` padded.

    U is the longest row's count (one device-to-host read on CUDA).
    """
    if ids.shape[-1] == 0:
        return ids.new_full((*ids.shape[:-1], 0), _BIG), 0
    x = torch.where(ids < 0, _BIG, ids).sort(dim=-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, _BIG, x).sort(dim=-1).values
    u = int((x < _BIG).sum(dim=-1).max()) if x.numel() else 0
    return x[..., :u].contiguous(), u


def _union_by_first_use(ids: torch.Tensor, width: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Distinct group ids of each row, ordered by the first position that chose them.

    Parameters
    ----------
    ids : Tensor ``[B, Hkv, Lb, n]`` int64
        Per (row, KV head, position) the groups its query heads chose (-1 = none).
    width : int or None
        Columns of the result; None: the longest row's count (one device-to-host read).

    Returns
    -------
    union : Tensor ``[B, Hkv, U]`` int64, ``_BIG`` padded
        A column's position depends only on the positions up to the first one that chose
        it, so a query's groups sit in the same columns whatever later positions chose; with
        a fixed ``width`` the shapes do not depend on them either (bit-exact causality).
    col : Tensor ``[B, Hkv, Lb, n]`` int64
        Column of each entry of ``ids`` in ``union`` (``U`` for -1 entries).
    U : int
    """
    b, h, lb, n = ids.shape
    flat = ids.reshape(b, h, lb * n)
    pos = torch.arange(lb, device=ids.device).repeat_interleave(n)
    key = torch.where(flat < 0, _BIG, flat * lb + pos).sort(dim=-1).values  # by id, then position
    gid, first = key // lb, key % lb
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[..., 1:] = gid[..., 1:] == gid[..., :-1]
    big = _BIG // (lb + 1)
    order_key = torch.where(dup | (key >= _BIG), _BIG, first * big + gid).sort(dim=-1).values
    union = torch.where(order_key >= _BIG, _BIG, order_key % big)
    if width is None:
        width = int((union < _BIG).sum(dim=-1).max()) if union.numel() else 0
    union = union[..., :width] if union.shape[-1] >= width else torch.nn.functional.pad(
        union, (0, width - union.shape[-1]), value=_BIG
    )
    by_id = union.argsort(dim=-1)
    srt = union.gather(-1, by_id)
    at = torch.searchsorted(srt, flat.clamp(min=0)).clamp(max=max(width - 1, 0))
    col = by_id.gather(-1, at) if width else at
    col = torch.where(flat >= 0, col, width).reshape(b, h, lb, n)
    return union.contiguous(), col, width
