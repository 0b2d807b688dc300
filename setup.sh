#!/usr/bin/env bash
# Sets up .venv/ with the whole stack, from this project's own files:  bash setup.sh
# TORCH_PIN overrides the torch pair (default: the pair known to import with open_clip's torchvision here).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet $TORCH_PIN
.venv/bin/python -m pip install --quiet -e ".[mlflow,test]"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  # DeepSpeed on CPU JIT-compiles a shared-memory collective on first use (~40 s, cached under
  # ~/.cache/torch_extensions); build it once here instead of inside the first training run.
  DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
  # train.offload_optimizer=true runs DeepSpeed's CPU Adam, another JIT-compiled op (~60 s): build it here too.
  DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null
fi
# The report test renders the HTML report in headless Chromium; browser downloads are unreachable, so Debian's.
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  else
    echo "note: chromium is missing; tests/evaluate/test_report.py needs it (as root: apt-get update && apt-get install -y chromium)"
  fi
fi
echo "setup done: .venv/ is ready"
