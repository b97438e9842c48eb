#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, slow end-to-end tests included:
#   1. every test on the CPU reference path (kernels vs float64, engine, e2e with real vLLM + DeepSpeed);
#   2. the kernel tests again under TRITON_INTERPRET=1, proving the Triton kernels themselves.
# Extra arguments go to both pytest runs (e.g. `-m "not slow"` for the inner loop).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds a comm op into this cache; one per venv, so checkouts don't rebuild each other's.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}"
# Cache bytecode: every stage/test subprocess otherwise recompiles torch & co. (~5 s each).
unset PYTHONDONTWRITEBYTECODE
# Each test launch removes its own DeepSpeed shm buffers (tests/engine/_scripts/launch.py). At exit,
# sweep up what a killed run left: buffers are named ..._<port>_<rank>, and a buffer whose port no
# longer accepts connections belongs to a finished run. A live run elsewhere keeps its buffers.
cleanup() {
  local f port
  for f in /dev/shm/deepspeed_allreduce_buffer_*; do
    [[ -e "$f" ]] || continue
    port="$(basename "$f" | awk -F_ '{print $(NF-1)}')"
    [[ "$port" =~ ^[0-9]+$ ]] || continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then rm -f "$f"; fi
  done
}
trap cleanup EXIT

status=0
echo "== pytest (CPU reference path + engine)"
"$PY" -m pytest tests -q "$@" || status=$?
echo "== pytest tests/kernels under TRITON_INTERPRET=1 (Triton kernels through the interpreter)"
TRITON_INTERPRET=1 "$PY" -m pytest tests/kernels -q "$@" || status=$?
exit $status
