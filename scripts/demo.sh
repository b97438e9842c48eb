#!/usr/bin/env bash
# The main job: set up .venv (idempotent) and run the RLHF pipeline on a tiny model, on CPU.
# Usage: bash scripts/demo.sh [RUN_DIR]   (RUN_DIR defaults to runs/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
RUN_DIR="${1:-runs/demo}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds a comm op into this cache; one per venv, so checkouts don't rebuild each other's.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}"
# Cache bytecode: every stage/test subprocess otherwise recompiles torch & co. (~5 s each).
unset PYTHONDONTWRITEBYTECODE
mkdir -p "$RUN_DIR"
exec "$ROOT/.venv/bin/python" -m tritonrlhf.engine.demo.pipeline "$RUN_DIR" "${@:2}"
