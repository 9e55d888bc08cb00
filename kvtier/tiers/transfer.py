"""Host-to-device chunk copies: coalesced runs on the DMA engine, a gather kernel for the rest.

Measured on the H200 machine (platform.md): one pinned copy moves 55 GB/s, one copy per
256 KiB chunk about 33 GB/s, and a kernel loading scattered 8 KiB groups straight from
pinned host memory 44 to 51 GB/s. So chunks whose host slots and device slots are both
consecutive move as one ``copy_`` per run, and scattered chunks move in one launch of
the group gather kernel (``kvtier.kernels.gather_groups``) when it is available.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = ["MIN_RUN", "copy_chunks"]

log = logging.getLogger("kvtier.tiers")

#: Runs of at least this many consecutive chunks go through ``copy_`` (the DMA engine);
#: 2 MiB copies already reach 51 of 55 GB/s. Shorter runs go through the gather kernel.
MIN_RUN = 8

_GATHER: object = None  # the kernel launcher, False once its import failed


def _gather_kernel():  # type: ignore[no-untyped-def]
    global _GATHER
    if _GATHER is None:
        try:
            from kvtier.kernels.gather_groups import gather_groups

            _GATHER = gather_groups
        except Exception as exc:  # noqa: BLE001  (no Triton or no kernels: one copy_ per chunk)
            log.info("kvtier: gather kernel unavailable (%s); scattered chunks use one copy_ each", exc)
            _GATHER = False
    return _GATHER or None


def _runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of maximal runs where both slot ids step by one."""
    runs = []
    i = 0
    while i < len(pairs):
        j = i + 1
        while j < len(pairs) and pairs[j][0] == pairs[j - 1][0] + 1 and pairs[j][1] == pairs[j - 1][1] + 1:
            j += 1
        runs.append((pairs[i][0], pairs[i][1], j - i))
        i = j
    return runs


def copy_chunks(
    src: torch.Tensor,
    dst: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    *,
    group_size: int,
    use_kernel: bool = True,
) -> int:
    """Enqueue copies of chunks ``src[h] -> dst[d]`` for each ``(h, d)`` on the current stream.

    Parameters
    ----------
    src : torch.Tensor
        Host slab ``[S, 2, Hkv, C, D]`` (pinned, for asynchronous copies and the kernel).
    dst : torch.Tensor
        Device slab ``[S', 2, Hkv, C, D]``, same dtype.
    pairs : sequence of (int, int)
        ``(src slot, dst slot)``, destinations distinct; best sorted by source slot.
    group_size : int
        Tokens per group (the kernel's unit), divides C.
    use_kernel : bool
        Allow the gather kernel for chunks outside long runs (CUDA destinations only).

    Returns
    -------
    int
        Copy operations enqueued (runs plus kernel launches), for statistics.
    """
    short: list[tuple[int, int, int]] = []
    ops = 0
    for h0, d0, n in _runs(pairs):
        if n >= MIN_RUN:
            dst[d0 : d0 + n].copy_(src[h0 : h0 + n], non_blocking=True)
            ops += 1
        else:
            short.append((h0, d0, n))
    if not short:
        return ops
    kernel = _gather_kernel() if use_kernel and dst.is_cuda and src.is_pinned() else None
    if kernel is None:
        for h0, d0, n in short:
            dst[d0 : d0 + n].copy_(src[h0 : h0 + n], non_blocking=True)
        return ops + len(short)
    hs = torch.tensor([h0 + i for h0, _, n in short for i in range(n)], dtype=torch.int32)
    ds = torch.tensor([d0 + i for _, d0, n in short for i in range(n)], dtype=torch.int32)
    num_kv_heads, chunk_size = src.shape[2], src.shape[3]
    m = chunk_size // group_size
    g = torch.arange(m, dtype=torch.int32)[None, :, None]
    shape = (hs.numel(), m, num_kv_heads)
    table = torch.stack(
        [
            (hs[:, None, None] * m + g).expand(shape),
            (ds[:, None, None] * m + g).expand(shape),
            torch.arange(num_kv_heads, dtype=torch.int32)[None, None, :].expand(shape),
        ],
        dim=-1,
    ).reshape(-1, 3)
    kernel(src, table.to(dst.device), dst, group_size=group_size)
    return ops + 1
