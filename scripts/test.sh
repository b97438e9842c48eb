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
cleanup() { rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true; }
trap cleanup EXIT

status=0
echo "== pytest (CPU reference path + engine)"
"$PY" -m pytest tests -q "$@" || status=$?
echo "== pytest tests/kernels under TRITON_INTERPRET=1 (Triton kernels through the interpreter)"
TRITON_INTERPRET=1 "$PY" -m pytest tests/kernels -q "$@" || status=$?
exit $status
