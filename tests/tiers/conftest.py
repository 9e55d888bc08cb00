"""Fixtures of the storage tests: small layouts and seeded chunks."""

from __future__ import annotations

import pytest
import torch

from kvtier.layout import KVLayout


def seeded_chunk(layout: KVLayout, seed: int) -> torch.Tensor:
    """A seeded chunk ``[2, Hkv, C, D]`` of random bytes (NaN bit patterns included: compare bytes)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (layout.chunk_bytes,), dtype=torch.uint8, generator=g)
    return raw.view(layout.dtype).view(layout.chunk_shape).clone()


@pytest.fixture
def make_chunk():
    """The :func:`seeded_chunk` builder."""
    return seeded_chunk


@pytest.fixture
def tiny_layout() -> KVLayout:
    """chunk_bytes = 2*1*4*8*2 = 128 bytes: not a 4 KiB multiple (bounce-buffer read path)."""
    return KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_size=4, group_size=2)


@pytest.fixture
def page_layout() -> KVLayout:
    """chunk_bytes = 2*2*16*64*2 = 8 KiB: a 4 KiB multiple (zero-copy O_DIRECT path)."""
    return KVLayout(
        num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, chunk_size=16, group_size=8
    )
