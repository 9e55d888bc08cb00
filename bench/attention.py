"""HGA attention kernels beside torch SDPA: ``python bench/attention.py [--smoke]``.

The sweep lives in :mod:`kvtier.cli.bench_attention` (also ``kvtier bench attention``).
"""

from __future__ import annotations

import sys

from kvtier.cli.bench_attention import main

if __name__ == "__main__":
    sys.exit(main())
