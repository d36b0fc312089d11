#!/usr/bin/env bash
# The one script to run on a GPU machine (no internet needed): install the
# project, run the GPU tests, run every benchmark, print a summary last.
# Every stage is time-limited with `timeout`; the whole run ends in < 5 minutes.
#
#   bash bench/gpu_check.sh            # canonical shapes
#   bash bench/gpu_check.sh --smoke    # tiny shapes (checks the script itself, e.g. on CPU)
#
# Environment:
#   OUT           folder that receives gpu_check.log, summary.txt and this run's
#                 bench/results/*.json (bundled into results.tar.gz when there are
#                 more than 5, since few files come back from a device machine)
#   PYTHON        interpreter (default python3)
#   TOTAL_S       overall budget in seconds (default 285)
#   INSTALL_S, TEST_S, ROLLOUT_S, PROFILE_S, BENCH_EACH_S   caps per stage / per bench (60, 90, 60, 60, 120)
#   VLLM_S        cap of the vllm backend stage, run only where vllm is importable (120)
#   BENCHES       comma-separated bench names, in order (default: all, packing last)
# Wheels in .whl/ (if any) are installed to /tmp/site and put on PYTHONPATH first.
# The pure-Python peers travel that way (.whl/ is git-ignored; name it in the device
# run's `carry`). Fetch them on a machine with the network, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl liger-kernel cut-cross-entropy
# (seen 2026-11-27: liger_kernel-0.8.5, cut_cross_entropy-25.1.1, both py3-none-any).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke"
# No network there: pip must never reach for an index; a system Python may be
# marked externally managed (PEP 668), which this throwaway machine may ignore.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
START=$(date +%s)
DEADLINE=$((START + ${TOTAL_S:-285}))
LOGDIR=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/fusedrl-gpu-check.XXXXXX")}
mkdir -p "$LOGDIR" bench/results
LOG="$LOGDIR/gpu_check.log"
SUMMARY="$LOGDIR/summary.txt"
STAMP=$(mktemp)  # results newer than this file were written by this run
: >"$LOG"
: >"$SUMMARY"

log() { echo "$@" | tee -a "$LOG"; }
note() { echo "$@" >>"$SUMMARY"; }
left() { echo $((DEADLINE - $(date +%s))); }
# budget CAP: the cap, or what is left before the deadline (minus a reserve for the summary)
budget() { local l=$(($(left) - 10)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

# stage NAME CAP CMD...: run CMD under `timeout`, tee its output into the log, record rc and time.
stage() {
  local name=$1 cap=$2; shift 2
  local t; t=$(budget "$cap")
  if [ "$t" -lt 5 ]; then note "$(printf '%-22s skipped: no time left' "$name")"; return 124; fi
  log ""; log "=== $name (limit ${t}s): $*"
  local s; s=$(date +%s)
  timeout --kill-after=5 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local what="ok"
  [ "$rc" -ne 0 ] && what="FAILED rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT after ${t}s"
  note "$(printf '%-22s %-22s %4ss' "$name" "$what" "$(($(date +%s) - s))")"
  return "$rc"
}

# 1. wheels shipped with the tree (the machine has no internet)
if compgen -G ".whl/*.whl" >/dev/null; then
  stage "wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 2. the project (with the C++ core; without it if the build fails: the Python fallback serves)
if ! stage "install" "${INSTALL_S:-60}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .; then
  stage "install (no C++ ext)" "${INSTALL_S:-60}" \
    env FUSEDRL_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
ENV_LINE=$("$PY" - <<'EOF' 2>&1
import torch
from fusedrl import packing
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
try:
    import triton
    tv = triton.__version__
except Exception:
    tv = "absent"
print(f"{gpu} | torch {torch.__version__} | triton {tv} | fusedrl._C {'built' if packing.HAS_CSRC else 'absent (python packing)'}")
EOF
)
log "environment: $ENV_LINE"

# 3. GPU tests (pytest -m gpu); the ini's --benchmark-disable needs pytest-benchmark
PYTEST_OPTS=()
"$PY" -c "import pytest_benchmark" 2>/dev/null || PYTEST_OPTS=(-o "addopts=-ra")
# pytest's rc 5 (nothing collected) is not a failure here
stage "gpu tests" "${TEST_S:-90}" bash -c '"$@"; rc=$?; [ $rc = 5 ] && echo "no GPU tests collected" && rc=0; exit $rc' _ \
  "$PY" -m pytest -q -m gpu ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} tests

# 3b. the native rollout engine on the GPU: the split-KV decode kernel (and flash-attn's kvcache path
#     when installed) vs a float64 oracle; CUDA-graphed multi-step decode vs eager vs HF greedy.
#     (Also collected by the stage above; run here on its own so its status shows in the summary.)
stage "rollout engine" "${ROLLOUT_S:-60}" "$PY" -m pytest -q -m gpu ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} \
  tests/rollout/test_engine_cuda.py tests/kernels/test_decode_attention.py
# 3b'. the vllm rollout backend (issue 15): only where vllm is importable (it is an optional extra and
#      is not installed by this script): a tiny Qwen2 colocated in-process, weights pushed, greedy vs
#      the native engine, sampling with log-probs, sleep / wake.
if "$PY" -c "import sys, importlib.util as u; sys.exit(0 if u.find_spec('vllm') else 1)" 2>/dev/null; then
  stage "rollout vllm" "${VLLM_S:-120}" "$PY" -m pytest -q -m gpu ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} \
    tests/rollout/test_vllm.py
else
  note "$(printf '%-22s skipped: vllm not installed (pip install fusedrl[vllm])' "rollout vllm")"
fi
# 3c. 1-GPU FSDP2 smoke (issue 16): a world-size-1 NCCL group, sharded SFT/GRPO steps, bf16 + AC,
#     CPU offload, gathered params, DCP round trip; skipped without CUDA
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  stage "fsdp2 smoke" "${FSDP_S:-60}" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m tests.distributed.gpu_smoke
else
  note "$(printf '%-22s skipped: no CUDA device' "fsdp2 smoke")"
fi
# 3d. `fusedrl train` under torchrun on one GPU (issue 16): a world-size-1 NCCL group, the policy (and the
#     RL reference / reward models) sharded with FSDP2, 2 steps of every stage's tiny example, DCP
#     checkpoints, the final model gathered; the SFT run first (its final model is the distill teacher)
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  TRAIN_OUT=$(mktemp -d "${TMPDIR:-/tmp}/fusedrl-train.XXXXXX")
  for st in sft reward_model prm rejection dpo grpo ppo distill; do
    extra=()
    [ "$st" = sft ] && extra=(--run.out_dir=runs/sft-tiny --overwrite --checkpoint.every=1)
    [ "$st" = distill ] && extra=(--distill.teacher=runs/sft-tiny/final)
    stage "train 1-gpu $st" "${TRAIN_EACH_S:-40}" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
      -m fusedrl train "examples/${st}_tiny.toml" --run.device=cuda --loop.max_steps=2 --loop.eval_every=0 \
      --logging.progress=false --logging.plots=false "--run.out_dir=$TRAIN_OUT/$st" ${extra[@]+"${extra[@]}"}
    # (the extras come last: for sft, run.out_dir=runs/sft-tiny wins)
  done
else
  note "$(printf '%-22s skipped: no CUDA device' "train 1-gpu")"
fi

# 3d. profiling on the GPU (issue 17): CUDA traces with the fusedrl.* ranges, NVTX, measured ceilings,
#     `fusedrl profile OP` and `fusedrl profile run` with synchronised phases
stage "profile tests" "${PROFILE_S:-60}" "$PY" -m pytest -q -m gpu ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} \
  tests/profile/test_profile_cuda.py
stage "profile logprobs" "${PROFILE_S:-60}" "$PY" -m fusedrl profile linear_logprobs --backward \
  --shape N=16384,H=4096,V=151936 --json "$LOGDIR/profile_linear_logprobs.json"

# 4. benchmarks, one process each; each gets a fair share of the time left (capped)
if [ -n "${BENCHES:-}" ]; then
  NAMES=$(echo "$BENCHES" | tr ',' ' ')
else
  ALL=$("$PY" -m fusedrl.bench.run_all --list 2>>"$LOG")
  NAMES="$(echo "$ALL" | grep -vx packing | tr '\n' ' ') $(echo "$ALL" | grep -x packing)"
fi
set -- $NAMES
while [ $# -gt 0 ]; do
  share=$(( ($(left) - 10) / $# ))
  cap=${BENCH_EACH_S:-120}
  [ "$share" -lt "$cap" ] && cap=$share
  stage "bench $1" "$cap" "$PY" -m fusedrl.bench.run_all --only "$1" $SMOKE
  shift
done

# 5. results of this run into $OUT
NEW=$(find bench/results -maxdepth 1 -name '*.json' -newer "$STAMP" | sort)
COUNT=$(echo "$NEW" | grep -c . || true)
if [ -n "${OUT:-}" ] && [ "$COUNT" -gt 0 ]; then
  if [ "$COUNT" -le 5 ]; then
    cp $NEW "$OUT"/
  else
    tar -czf "$OUT/results.tar.gz" $NEW
  fi
fi
rm -f "$STAMP"

# summary last
{
  echo ""
  echo "=================== gpu_check summary ==================="
  echo "$ENV_LINE"
  cat "$SUMMARY"
  echo "results written this run ($COUNT):"
  for f in $NEW; do echo "  $f"; done
  grep -h "^run_all: " "$LOG" | sed 's/^/  /'
  echo "total $(($(date +%s) - START))s of ${TOTAL_S:-285}s; logs in $LOGDIR"
} | tee -a "$LOG"
