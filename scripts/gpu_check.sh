#!/usr/bin/env bash
# The one-shot GPU check (nlm/bench/gpu.py says what it measures). Made for a lent machine with
# one NVIDIA GPU and a CUDA build of torch, but no Ray and no package registry:
#
#   scripts/gpu_check.sh --build-wheels   # HERE (with the registry): DeepSpeed and its pure-
#                                         # Python needs as wheels in .whl/ (about 5 MB)
#   scripts/gpu_check.sh [ARGS]           # THERE, from the repository root with .whl/ beside
#                                         # it: installs .whl/ into /tmp, stages nlm, runs
#                                         # `nlm bench gpu ARGS`; JSON summary on the last line
#   scripts/gpu_check.sh --dry-run        # anywhere: the same steps on the CPU, tiny sizes (CI)
#
# PYTHON names the interpreter (default: python3). Under 8 minutes of wall time on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=.whl
SITE="${NLM_GPU_SITE:-/tmp/nlm-gpu-site}"
# What DeepSpeed 0.19.8 needs that a CUDA torch image may lack (the others, numpy, packaging,
# psutil, py-cpuinfo, tqdm, ninja, msgpack, einops, nvidia-ml-py, ship with such images).
PURE=(hjson annotated-types typing-inspection typing-extensions)

version() { # the installed version of a distribution (metadata only: importing may print)
    "$PYTHON" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1"
}

build_wheels() {
    # DeepSpeed as a pure-Python wheel: no CUDA ops compiled in (nlm uses torch's fused AdamW).
    # Its build imports torch, so it runs in this checkout's environment (no build isolation).
    # pydantic-core is compiled: fetched for the lent machine's Python (3.12 unless told).
    local target_python="${GPU_PYTHON_VERSION:-3.12}"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" \
        "deepspeed==$(version deepspeed)"
    local pydantic core name pure=()
    for name in "${PURE[@]}"; do pure+=("$name==$(version "$name")"); done
    pydantic=$(version pydantic)
    core=$(version pydantic-core)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$target_python" \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "pydantic==$pydantic" "pydantic-core==$core" "${pure[@]}"
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

stage() {
    # DeepSpeed and friends from the carried wheels, unless this Python already has them.
    if ! "$PYTHON" -c 'import deepspeed' 2>/dev/null; then
        if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
            echo "gpu_check: no deepspeed here and no $WHEELS/*.whl (run --build-wheels where a registry is)" >&2
            exit 2
        fi
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE/deps" "$WHEELS"/*.whl
        export PYTHONPATH="$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # nlm itself, laid out as it installs (cluster/ -> nlm.cluster, serve/ -> nlm.serve: the
    # package-dir of pyproject.toml), without pip or a build backend.
    if ! "$PYTHON" -c 'import nlm.cluster.train.loop' 2>/dev/null; then
        rm -rf "$SITE/src" && mkdir -p "$SITE/src"
        cp -r nlm "$SITE/src/nlm"
        cp -r cluster "$SITE/src/nlm/cluster"
        cp -r serve "$SITE/src/nlm/serve"
        export PYTHONPATH="$SITE/src${PYTHONPATH:+:$PYTHONPATH}"
        # From the repository root, the bare nlm/ here would shadow the staged one (it has no
        # cluster/): keep the working directory off sys.path, in the training subprocesses too.
        export PYTHONSAFEPATH=1
    fi
}

case "${1:-}" in
--build-wheels)
    build_wheels
    exit 0
    ;;
--dry-run)
    export DS_ACCELERATOR=cpu
    ;;
*)
    stage
    ;;
esac
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m nlm bench gpu "$@"
