"""Helpers of the kernel tests: seeded inputs and the tolerance rule of the style guide."""

from __future__ import annotations

import torch

from kvtier.layout import windows_at


def assert_close_to_ref(
    out: torch.Tensor, ref32: torch.Tensor, same_dtype: torch.Tensor, *, floor: float = 1e-5
) -> None:
    """``max|out - ref32| <= 2 * max|same_dtype - ref32| + floor``, reported verbosely."""
    err = (out.float() - ref32.float()).abs()
    budget = 2 * (same_dtype.float() - ref32.float()).abs().max().item() + floor
    assert torch.isfinite(out.float()).all(), "non-finite values in the kernel output"
    bad = err > budget
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {err.numel()} elements over {budget:.3g} (max err {err.max().item():.3g}); "
            f"first at {idx}"
        )


def random_routed(
    positions: list[int],
    num_q_heads: int,
    width: int,
    *,
    chunk_size: int,
    group_size: int,
    sink_chunks: int,
    local_chunks: int,
    fill: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """``[B, Hq, width]`` int32 distinct global group ids of candidate chunks, -1 padded."""
    gen = torch.Generator().manual_seed(seed)
    m = chunk_size // group_size
    out = torch.full((len(positions), num_q_heads, width), -1, dtype=torch.int32)
    for b, pos in enumerate(positions):
        w = windows_at(pos, chunk_size, sink_chunks, local_chunks)
        cand = torch.arange(w.sink_end * m, w.local_start * m, dtype=torch.int32)
        for h in range(num_q_heads):
            n = min(width, len(cand), int(round(width * fill)))
            pick = cand[torch.randperm(len(cand), generator=gen)[:n]]
            out[b, h, :n] = pick
    return out
