#!/usr/bin/env bash
# One call on the GPU machine for the whole project: the gpu-marked tests of kernels,
# dispatcher, transformers integration and store, then `kvtier bench attention` at 128K and
# 1M (batch 1 and 4). Carry .whl (crc32c, kvikio and pytest's small deps). Results in $OUT.
# About 3 minutes of device time.
set -u
OUT=${OUT:-/tmp/kvtier-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || { ln -sfn ../kernels kvtier/kernels; export PYTHONPATH=/tmp/site:$PWD; }
python3 -c "import torch, triton, transformers, kvtier; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/env_final.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_attention_dispatch.py tests/test_hf.py tests/test_store.py tests/tiers/test_transfer.py 2>&1 | tee "$OUT/pytest_gpu_final.txt" | tail -12
timeout 150 python3 -m kvtier bench attention --contexts 128K,1M --batch 1,4 --csv "$OUT/attention_final.csv" 2>&1 | tee "$OUT/bench_attention_final.txt" | tail -30
