"""Test-wide setup: the Triton interpreter without a GPU, and the ``gpu`` marker.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when
``@triton.jit`` decorates), so it is set here, at collection time, when CUDA is absent.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine (bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
