#!/usr/bin/env bash
# Issue 11's fidelity sweeps (bench/fidelity_queue.py) on the GPU machine, with SmolLM2's real
# weights. SmolLM2's GGUF travels in two halves (bench/gpu_env.sh), so the calls go:
#
#   bench/gpu_fidelity.sh stash    carry .whl and .carry/smollm2/part-aa: keeps the half (seconds)
#   bench/gpu_fidelity.sh run      carry .whl and .carry/smollm2/part-ab: joins the halves, converts
#                                  the model once, runs the queue for $SECONDS_BUDGET (540) seconds
#   bench/gpu_fidelity.sh run      again (nothing to carry) on the same warm machine: continues the
#                                  queue where the last call stopped (/tmp/kvtier-fid)
#
# DONE="bench/results/<folder> ..." skips the items an earlier session finished (their JSON is
# committed there; name folders of the same part only: a name like `nll_b1728_4096_default`
# meant another default on another day).
#
# Each call must follow the last one within the machine's 30 s warm window. Every call leaves
# $OUT/fidelity.tar.gz (every JSON and log so far) and $OUT/env_fidelity.txt.
set -u
MODE=${1:-}
OUT=${OUT:-/tmp/kvtier-out}
. "$(dirname "$0")/gpu_env.sh"
case "$MODE" in stash|run) ;; *) echo "usage: bench/gpu_fidelity.sh stash|run (see the header)"; exit 2;; esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if [ "$MODE" = stash ]; then
    gpu_env_stash_half; ls -la "$STASH"; exit 0
fi
gpu_env_install
gpu_env_smollm2 || { echo "SmolLM2's GGUF halves did not come together: no run (random weights say nothing here)"; exit 1; }
{ python3 -c "import torch, triton, transformers, kvtier; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "commit ${KVTIER_COMMIT:-unset}"; } \
    2>&1 | tee "$OUT/env_fidelity.txt"
done_args=(); for d in ${DONE:-}; do done_args+=(--done "$d"); done
python3 bench/fidelity_queue.py --state /tmp/kvtier-fid --seconds "${SECONDS_BUDGET:-540}" --out "$OUT" "${done_args[@]}"
