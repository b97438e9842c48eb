#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (torch 2.11, Triton 3.6, no vLLM or
# DeepSpeed; its python3 holds torch). Each step has a time limit; together under 8 minutes:
#   1. the kernel tests, every one on CPU and on CUDA, the GPU-only `cuda` tier included;
#   2. benchmarks/bench_kernels.py at the README's shapes (N=16384, V=151936, H=4096 bf16; KL and
#      the PPO losses at 4,194,304 tokens; GAE at 512x8192) for eager, triton, Liger and
#      flash-attn (a peer that is not importable gets a row saying so), every row with its
#      fraction of the HBM or FLOP roofline, plus the linear_logprobs peak-memory row;
#   3. the torch.compile rows, last and under their own limit (compilation is the slow part;
#      rows are written kernel by kernel, so a limit hit keeps the finished ones).
# Rows are appended to benchmarks/results/kernels.csv with the device name, versions and git SHA.
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [--out CSV] [--wheels DIR]
#   --dry-run  everything but the CUDA launches, on CPU (CUDA hidden): the `cuda` test tier is
#              collected and skipped, the benchmark runs at micro shapes with Triton through the
#              interpreter, torch.compile on its eager backend and the roofline columns against
#              H200 peaks, into a temporary CSV
#   --out      the CSV to append to (default: benchmarks/results/kernels.csv; a temporary file
#              with --dry-run)
#   --wheels   pip-install the wheels in DIR (e.g. liger_kernel) into a temporary folder first
#              (default: .whl/ when it holds any)
# Environment: PYTHON (default python3, or .venv/bin/python with --dry-run), GIT_SHA (for the CSV
# where the checkout has no .git), GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S, GPU_CHECK_COMPILE_S
# (the steps' time limits in seconds).
# Exit status: 0 when every step passed, 1 when one failed, 2 for bad usage or no GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0 OUT="" WHEELS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a path}"; shift ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ $DRY == 1 && -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [[ -z "${GIT_SHA:-}" ]]; then
  GIT_SHA="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)"
  [[ -n "$GIT_SHA" && -n "$(git -C "$ROOT" status --porcelain -- kernels benchmarks 2>/dev/null)" ]] &&
    GIT_SHA="$GIT_SHA+dirty"
fi
export GIT_SHA

if [[ $DRY == 1 ]]; then
  echo "== gpu_check: dry run (CPU, CUDA hidden, micro shapes, Triton through the interpreter)"
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  [[ -n "$OUT" ]] || OUT="$(mktemp -d)/kernels.csv"
  TEST_S="${GPU_CHECK_TEST_S:-60}" BENCH_S="${GPU_CHECK_BENCH_S:-120}" COMPILE_S="${GPU_CHECK_COMPILE_S:-120}"
  TESTS=(tests/kernels -m cuda)
  # H200 datasheet peaks, only so that the roofline columns are computed (meaningless on a CPU).
  BENCH=(--size micro --device cpu --cpu-threads 1 --cpu-budget-s 0.02 --compile-backend eager --peaks 4800,989)
else
  echo "== gpu_check on $(hostname)"
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PYTHON sees no CUDA device (use --dry-run on a machine without one)" >&2
    exit 2
  fi
  [[ -n "$OUT" ]] || OUT="$ROOT/benchmarks/results/kernels.csv"
  TEST_S="${GPU_CHECK_TEST_S:-200}" BENCH_S="${GPU_CHECK_BENCH_S:-160}" COMPILE_S="${GPU_CHECK_COMPILE_S:-90}"
  TESTS=(tests/kernels tests/engine/rl/test_packing_cuda.py)  # + flash-attention packing (needs flash-attn)
  # Files in parallel (one file's tests stay in one process): Triton compiles are the slow part.
  "$PYTHON" -c "import xdist" 2>/dev/null && TESTS+=(-n 4 --dist loadfile)
  BENCH=(--size default --device cuda)
fi
"$PYTHON" -c "import torch, triton; print('python', __import__('sys').version.split()[0], \
'| torch', torch.__version__, '| triton', triton.__version__, \
'| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

if [[ -z "$WHEELS" && -d "$ROOT/.whl" ]] && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then WHEELS="$ROOT/.whl"; fi
if [[ -n "$WHEELS" ]]; then
  PEERS="$(mktemp -d)"
  if "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$PEERS" "$WHEELS"/*.whl; then
    export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"
    echo "peers: installed $(cd "$WHEELS" && echo *.whl)"
  else
    echo "peers: could not install the wheels in $WHEELS; their rows will say so" >&2
  fi
fi

status=0
step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit, report, remember a failure
  local name="$1" limit="$2" rc start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "gpu_check: $name hit its ${limit}s limit" >&2
    status=1
  elif [[ $rc != 0 ]]; then
    echo "gpu_check: $name failed (exit $rc)" >&2
    status=1
  fi
}

step "kernel tests" "$TEST_S" "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step "benchmark: eager, triton, liger, flash_attn + memory" "$BENCH_S" \
  "$PYTHON" benchmarks/bench_kernels.py "${BENCH[@]}" --providers eager,triton,liger,flash_attn --memory --out "$OUT"
step "benchmark: torch.compile" "$COMPILE_S" \
  "$PYTHON" benchmarks/bench_kernels.py "${BENCH[@]}" --providers compile --out "$OUT"

echo "== gpu_check: rows in $OUT; $([[ $status == 0 ]] && echo "every step passed" || echo "a step FAILED (above)")"
exit $status
