#!/usr/bin/env bash
# Attention kernels on the GPU machine in one call: the gpu-marked tests (bf16 at real sizes
# against the reference), then `kvtier bench attention` (SDPA beside HGA, 8K..1M, batch 1, 4).
# Results land in $OUT: pytest_gpu_attention.txt, bench_attention.txt, attention.csv.
# Carry .whl (crc32c for `import kvtier` on a machine without it).
set -u
OUT=${OUT:-/tmp/kvtier-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/crc32c*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/crc32c*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || { ln -sfn ../kernels kvtier/kernels; export PYTHONPATH=${PYTHONPATH:-}:$PWD; }
python3 -c "import torch, triton, kvtier; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" \
    2>&1 | tee "$OUT/env_attention.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv,noheader >> "$OUT/env_attention.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_attention_dispatch.py \
        2>&1 | tee "$OUT/pytest_gpu_attention.txt" | tail -25
fi
timeout "${BENCH_S:-330}" python3 -m kvtier bench attention --csv "$OUT/attention.csv" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench_attention.txt"
