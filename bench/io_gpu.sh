#!/usr/bin/env bash
# The storage suite on the GPU machine, in one call: gpu-marked and storage tests,
# `kvtier bench io` (disk, disk-to-GPU, host-to-GPU beside one pinned copy) and
# `kvtier stress` with a CUDA device tier. Results land in $OUT.
# Needs the wheels in .whl (kvikio-cu13 and its small deps, crc32c, tqdm, pytest): see
# docs/storage.md. The GPU machine has no network, zarr, tensorstore or hypothesis, so the
# snapshot and state-machine tests stay on CI.
# Knobs (defaults = the full run): SIZE=4GiB REPS=5 BACKEND=all STRESS_S=15 TEST_S=150
# BENCH_S=240 TESTS="<pytest paths>". A trimmed run (about 2.5 minutes):
#   SIZE=4GiB REPS=3 BACKEND=posix STRESS_S=8 TEST_S=60 BENCH_S=120 \
#   TESTS="tests/test_store.py tests/tiers/test_transfer.py tests/test_bench_io.py" bash bench/io_gpu.sh
set -u
OUT=${OUT:-/tmp/kvtier-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# Without an installed kvtier, kvtier.kernels (the top-level kernels/ folder, mapped by
# pyproject) is not importable and scattered host-to-GPU chunks fall back to one copy_ each.
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || { ln -sfn ../kernels kvtier/kernels; export PYTHONPATH=/tmp/site:$PWD; }
python3 -c "import torch, kvtier.tiers.io as io; print(torch.__version__, torch.cuda.get_device_name(0)); print(io.kvikio_status())" 2>&1 | tee "$OUT/env.txt"
python3 -c "import kvtier.kernels.gather_groups; print('gather kernel importable')" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$OUT/env.txt" 2>&1
grep -E " / | /tmp " /proc/mounts >> "$OUT/env.txt"
nproc >> "$OUT/env.txt"
TESTS=${TESTS:-tests/test_store.py tests/tiers/test_tiers.py tests/tiers/test_crash.py tests/tiers/test_faults.py tests/tiers/test_transfer.py tests/test_stress.py tests/test_bench_io.py}
# shellcheck disable=SC2086
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -15
timeout "${BENCH_S:-240}" python3 -m kvtier bench io --dir /tmp/kvb --size "${SIZE:-4GiB}" --reps "${REPS:-5}" \
    --backend "${BACKEND:-all}" --json "$OUT/io_gpu.json" --csv "$OUT/io_gpu.csv" 2>&1 | tee "$OUT/bench_io_gpu.txt"
timeout $(( ${STRESS_S:-15} + 15 )) python3 -m kvtier stress --seconds "${STRESS_S:-15}" --dir /tmp/kvs \
    --json "$OUT/stress_gpu.json" --no-progress 2>&1 | tee "$OUT/stress_gpu.txt"
