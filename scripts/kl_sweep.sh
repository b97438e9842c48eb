#!/usr/bin/env bash
# Seed exercise: PPO at KL coefficients {0, 0.01, 0.05, 0.2} on the demo task, then proxy (RM)
# reward and gold score against KL (RUN_DIR/kl_sweep/kl_sweep.{png,csv,json}).
# Reuses RUN_DIR/sft and RUN_DIR/rm (e.g. from scripts/demo.sh RUN_DIR); builds them if missing.
# Usage: bash scripts/kl_sweep.sh [RUN_DIR] [--coefs 0,0.2] [--steps N] [--eval-every K] [--size ci]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
RUN_DIR=runs/demo
if [[ $# -gt 0 && "$1" != -* ]]; then RUN_DIR="$1"; shift; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset PYTHONDONTWRITEBYTECODE  # cache bytecode across the stage processes, as demo.sh does
mkdir -p "$RUN_DIR"
exec "$ROOT/.venv/bin/python" -m tritonrlhf.engine.demo.kl_sweep "$RUN_DIR" "$@"
