"""Host-to-device chunk copies: runs and scattered chunks land bit-exact."""

from __future__ import annotations

import pytest
import torch

from kvtier.tiers.transfer import MIN_RUN, _runs, copy_chunks


def test_runs_split_where_either_side_jumps() -> None:
    pairs = [(0, 5), (1, 6), (2, 7), (4, 8), (5, 9), (9, 0)]
    assert _runs(pairs) == [(0, 5, 3), (4, 8, 2), (9, 0, 1)]


def _slabs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(-(2**15), 2**15, (40, 2, 2, 16, 8), dtype=torch.int16, generator=g).view(
        torch.bfloat16
    )
    if device == "cuda":
        src = src.pin_memory()
    return src, torch.zeros(40, 2, 2, 16, 8, dtype=torch.bfloat16, device=device)


def _pairs() -> list[tuple[int, int]]:
    long_run = [(i, 20 + i) for i in range(MIN_RUN + 2)]  # one copy_
    scattered = [(13, 3), (17, 1), (30, 39), (31, 0)]  # short runs: kernel or copy_ each
    return long_run + scattered


def test_copy_chunks_cpu_bit_exact() -> None:
    src, dst = _slabs("cpu")
    ops = copy_chunks(src, dst, _pairs(), group_size=4)
    assert ops == 1 + 4  # one copy_ for the long run, one per scattered chunk (no kernel on CPU)
    for h, d in _pairs():
        assert torch.equal(dst[d].view(torch.int16), src[h].view(torch.int16))


@pytest.mark.gpu
def test_copy_chunks_cuda_kernel_bit_exact() -> None:
    src, dst = _slabs("cuda")
    copy_chunks(src, dst, _pairs(), group_size=4)
    torch.cuda.synchronize()
    for h, d in _pairs():
        assert torch.equal(dst[d].cpu().view(torch.int16), src[h].view(torch.int16))
