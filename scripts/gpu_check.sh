#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (torch 2.11, Triton 3.6, transformers
# 5.17, no vLLM or DeepSpeed; its python3 holds torch). Each step has a time limit; together
# about 8 minutes (the defaults below add up to 540 s at most):
#   1. the kernel tests, every one on CPU and on CUDA, the GPU-only `cuda` tier included (with the
#      flash-attention packing and the CUDA-graph decode tests);
#   2. benchmarks/bench_kernels.py at the README's shapes (N=16384, V=151936, H=4096 bf16; KL and
#      the PPO losses at 4,194,304 tokens; GAE at 512x8192) for eager, triton, Liger and
#      flash-attn (a peer that is not importable gets a row saying so), every row with its
#      fraction of the HBM or FLOP roofline, plus the linear_logprobs peak-memory row;
#   3. the engine (benchmarks/bench_engine_gpu.py): DeepSpeed installed from the carried folder
#      (--prepare) into a temporary target without building ops; a random model of Qwen2-0.5B's
#      shape; the decode loop eager and as a CUDA graph; PPO and GRPO colocated on the GPU (HF
#      rollout, bf16, ZeRO-2 on NCCL, 64 prompts x 4 samples x 128 new tokens, 10 steps, 2 of
#      warm-up), then PPO with the kernels forced to their torch references; each run its own
#      step and limit, rows in benchmarks/results/engine_gpu.csv;
#   4. the torch.compile rows, last and under their own limit (compilation is the slow part;
#      rows are written kernel by kernel, so a limit hit keeps the finished ones).
# Rows are appended to benchmarks/results/{kernels,engine_gpu}.csv with the device name, versions
# and git SHA.
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [--only kernels|engine] [--out CSV] [--wheels DIR]
#        bash scripts/gpu_check.sh --prepare | --list
#   --prepare  here, with PyPI reachable: download DeepSpeed's source distribution and the wheels
#              of its requirements that the GPU image lacks into .gl/engine/ (git-ignored; send
#              it with the device tool's carry: [".gl"]) and print its size against the 64 MiB
#              that one call carries
#   --list     what --prepare downloads, and the size of what is there now (no network)
#   --dry-run  everything but the CUDA launches, on CPU (CUDA hidden): the `cuda` test tier is
#              collected and skipped, the benchmark runs at micro shapes with Triton through the
#              interpreter, torch.compile on its eager backend and the roofline columns against
#              H200 peaks, into a temporary CSV; the engine part at tiny shapes, on gloo, fp32,
#              the eager decode, the installed DeepSpeed, into a temporary CSV
#   --only     run only the kernel part (tests, kernel benchmarks, torch.compile) or the engine part
#   --out      the kernel CSV to append to (default: benchmarks/results/kernels.csv; a temporary
#              file with --dry-run)
#   --wheels   pip-install the wheels in DIR (e.g. liger_kernel) into a temporary folder first
#              (default: .whl/ when it holds any)
# Environment: PYTHON (default python3, or .venv/bin/python with --dry-run), GIT_SHA (for the CSV
# where the checkout has no .git), GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S, GPU_CHECK_COMPILE_S,
# GPU_CHECK_INSTALL_S, GPU_CHECK_DECODE_S, GPU_CHECK_PPO_S, GPU_CHECK_GRPO_S (the steps' time
# limits in seconds; the reference run has PPO's), GPU_CHECK_ENGINE_ARGS (more arguments for
# bench_engine_gpu.py, e.g. "--new-tokens 512 --steps 6"), GPU_CHECK_CARRY (the carried folder,
# default .gl/engine).
# Exit status: 0 when every step passed, 1 when one failed, 2 for bad usage or no GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0 OUT="" WHEELS="" ONLY="" PREPARE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=download ;;
    --list) PREPARE=list ;;
    --only) ONLY="${2:?--only needs kernels or engine}"; shift
      [[ $ONLY == kernels || $ONLY == engine ]] || { echo "gpu_check: --only kernels|engine, not $ONLY" >&2; exit 2; } ;;
    --out) OUT="${2:?--out needs a path}"; shift ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ ($DRY == 1 || -n $PREPARE) && -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi

# ---- what the engine part carries: DeepSpeed's sdist and the wheels of its requirements that the
# GPU image (torch 2.11, python 3.12) lacks or holds too old for them; the image has numpy,
# packaging, psutil, tqdm and torch (DeepSpeed 0.19.8's other requirements), setuptools and wheel
# (to install the sdist), and nvidia-ml-py. Versions: those the CPU stack was tested with.
CARRY="${GPU_CHECK_CARRY:-$ROOT/.gl/engine}"
DEEPSPEED_SDIST=(deepspeed==0.19.8)
CARRY_WHEELS=(hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 einops==0.8.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0)
IMAGE_HAS=(numpy packaging psutil tqdm torch)
LIMIT_MIB=64

carry_size() {  # print the carried folder's size and the tracked files' beside it; fail over 64 MiB
  local carry_b tree_b
  carry_b=$(du -sb "$CARRY" 2>/dev/null | cut -f1); carry_b=${carry_b:-0}
  tree_b=$(cd "$ROOT" && git ls-files -z 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  tree_b=${tree_b:-0}
  local total=$((carry_b + tree_b))
  printf 'carry: %s holds %d files, %.1f MiB; with the tracked files (%.1f MiB): %.1f of %d MiB\n' \
    "$CARRY" "$(find "$CARRY" -type f 2>/dev/null | wc -l)" "$(echo "$carry_b / 1048576" | bc -l)" \
    "$(echo "$tree_b / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
  if (( total > LIMIT_MIB * 1048576 )); then
    echo "gpu_check: over the $LIMIT_MIB MiB that one device call carries" >&2
    return 1
  fi
}

if [[ -n $PREPARE ]]; then
  echo "sdist: ${DEEPSPEED_SDIST[*]} (installed there with DS_BUILD_OPS=0, no ops built)"
  echo "wheels: ${CARRY_WHEELS[*]}"
  echo "image has: ${IMAGE_HAS[*]}"
  if [[ $PREPARE == download ]]; then
    mkdir -p "$CARRY"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$CARRY" "${CARRY_WHEELS[@]}" || exit 1
    # pip reads the sdist's metadata in an isolated build environment (setuptools and wheel from
    # PyPI; DeepSpeed's setup.py runs without torch there, building nothing)
    DS_BUILD_OPS=0 "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: \
      -d "$CARRY" "${DEEPSPEED_SDIST[@]}" || exit 1
    ls -1 "$CARRY"
  fi
  carry_size
  exit $?
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
  export TRITONRLHF_KERNELS=auto
  # H200 datasheet peaks, only so that the roofline columns are computed (meaningless on a CPU).
  BENCH=(--size micro --device cpu --cpu-threads 1 --cpu-budget-s 0.02 --compile-backend eager --peaks 4800,989)
  INSTALL_S="${GPU_CHECK_INSTALL_S:-60}" DECODE_S="${GPU_CHECK_DECODE_S:-120}"
  PPO_S="${GPU_CHECK_PPO_S:-180}" GRPO_S="${GPU_CHECK_GRPO_S:-180}"
  ENGINE=(--dry-run --out "$(dirname "$OUT")/engine_gpu.csv")
else
  echo "== gpu_check on $(hostname)"
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PYTHON sees no CUDA device (use --dry-run on a machine without one)" >&2
    exit 2
  fi
  [[ -n "$OUT" ]] || OUT="$ROOT/benchmarks/results/kernels.csv"
  TEST_S="${GPU_CHECK_TEST_S:-110}" BENCH_S="${GPU_CHECK_BENCH_S:-80}" COMPILE_S="${GPU_CHECK_COMPILE_S:-40}"
  INSTALL_S="${GPU_CHECK_INSTALL_S:-50}" DECODE_S="${GPU_CHECK_DECODE_S:-45}"
  PPO_S="${GPU_CHECK_PPO_S:-75}" GRPO_S="${GPU_CHECK_GRPO_S:-65}"
  ENGINE=()
  # + flash-attention packing (needs flash-attn) and the CUDA-graph decode step
  TESTS=(tests/kernels tests/engine/rl/test_packing_cuda.py tests/engine/rl/test_decode_graph.py -m cuda)
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

engine_deps() {  # DeepSpeed: the installed one, else the carried folder into a temporary target
  if "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    echo "deepspeed: $("$PYTHON" -c "from importlib.metadata import version; print(version('deepspeed'))") already importable"
    return 0
  fi
  if ! compgen -G "$CARRY/deepspeed-*.tar.gz" >/dev/null; then
    echo "gpu_check: no DeepSpeed to install: run 'bash scripts/gpu_check.sh --prepare' where PyPI is" \
      "reachable and carry the folder (.gl) with the call" >&2
    return 1
  fi
  local site
  site="$(mktemp -d)"
  DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile \
    --no-build-isolation --no-cache-dir --target "$site" "$CARRY"/*.whl "$CARRY"/deepspeed-*.tar.gz || return 1
  echo "$site" >"$ENGINE_SITE_FILE"
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    "import deepspeed, pydantic; print('deepspeed', deepspeed.__version__, 'from', deepspeed.__file__)"
}

if [[ $ONLY != engine ]]; then
  step "kernel tests" "$TEST_S" "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
  step "benchmark: eager, triton, liger, flash_attn + memory" "$BENCH_S" \
    "$PYTHON" benchmarks/bench_kernels.py "${BENCH[@]}" --providers eager,triton,liger,flash_attn --memory --out "$OUT"
fi
if [[ $ONLY != kernels ]]; then
  ENGINE_SITE_FILE="$(mktemp)"
  export -f engine_deps
  export CARRY PYTHON ENGINE_SITE_FILE
  step "engine: DeepSpeed" "$INSTALL_S" bash -c engine_deps
  site="$(cat "$ENGINE_SITE_FILE")"
  [[ -n $site ]] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  (
    unset TRITON_INTERPRET  # the engine's CPU dry run takes the references (the interpreter is slow)
    # shellcheck disable=SC2086
    engine() { step "engine: $1" "$2" "$PYTHON" benchmarks/bench_engine_gpu.py --runs "$1" "${ENGINE[@]}" ${GPU_CHECK_ENGINE_ARGS:-}; }
    engine decode "$DECODE_S"
    engine ppo "$PPO_S"
    engine grpo "$GRPO_S"
    engine ppo-reference "$PPO_S"
    exit $status
  ) || status=1
fi
if [[ $ONLY != engine ]]; then
  step "benchmark: torch.compile" "$COMPILE_S" \
    "$PYTHON" benchmarks/bench_kernels.py "${BENCH[@]}" --providers compile --out "$OUT"
fi

echo "== gpu_check: rows in $OUT and $(dirname "$OUT")/engine_gpu.csv; $([[ $status == 0 ]] && echo "every step passed" || echo "a step FAILED (above)")"
exit $status
