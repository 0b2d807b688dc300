#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): on a lent GPU machine, from the repository root, in one go.
# The machine's image has torch but not our other packages: they travel as wheels in bench/results/wheels/
# (git-ignored; `bash bench/gpu_check.sh --fetch-wheels` here fills it, ~43 MiB, under the 64 MiB a call carries;
# Ray's wheel is 79 MB, so it travels pruned (no jars/rllib/serve/llm) and xz-compressed instead).
# Device call: command "bash bench/gpu_check.sh", carry ["bench/results/wheels"], timeout_s 600.
set -euo pipefail
WHEELS=bench/results/wheels
RAY=2.60.0
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    PY=${PYTHON:-.venv/bin/python}
    platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
        -d "$WHEELS" diffusers==0.42.1 open_clip_torch==3.3.0 ftfy wcwidth hjson importlib_metadata jsonschema \
        jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types typing-inspection
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$tmp" "ray==$RAY"
    (cd "$tmp" && unzip -q ray-*.whl && rm -rf ray/jars ray/rllib ray/serve ray/llm ray-*.whl \
        && tar -cJf "ray-$RAY-cp312-pruned.tar.xz" ray ray-*.dist-info)
    mv "$tmp/ray-$RAY-cp312-pruned.tar.xz" "$WHEELS/" && rm -rf "$tmp"
    du -sh "$WHEELS"
    exit 0
fi
started=$(date +%s)
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
tar -xJf "$WHEELS"/ray-*-pruned.tar.xz -C "$SITE"
export PYTHONPATH="$SITE:$PWD" RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "[gpu_check.sh] packages installed in $(( $(date +%s) - started )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu_check.py "$@"
