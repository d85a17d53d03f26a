#!/usr/bin/env bash
# Runs the GPU bundle (scripts/gpu-bundle.sh) on a CUDA machine: every CUDA
# test and the GPU-vs-CPU agreement properties, the main job on CUDA with
# candle and with libtorch, and the GPU bench; writes a summary.
#
#   bash scripts/gpu-check.sh [BUNDLE_DIR]     # default: gpu-bundle
#
# Needs on that machine: an NVIDIA driver, and a python3 with torch of the
# version the bundle was built against (torch 2.11, any CUDA 13 build), whose
# libtorch and nvidia-* wheels (cuBLAS, cuRAND, the CUDA runtime) the
# binaries load. No Rust toolchain, no network.
#
# Results go to $OUT (default gpu-results), at most four files: summary.md
# (passed/failed/skipped per suite, the bench table, the main job's tables),
# bench.txt, train.txt and logs.tar.gz (every suite's full output). On a
# machine without a GPU it prints "no GPU found: skipping", writes that to
# the summary and exits 0. Exit status otherwise: 0 when every suite passed,
# 1 when one failed, timed out, or skipped its CUDA part (on a GPU machine a
# skipped CUDA leg means the binary did not see the GPU).
#
# Time: each suite has its own timeout and the whole run a budget
# (AMP_GPU_BUDGET_S, default 420 s) that later suites are cut to; the bench
# runs last, in its short form when less than 200 s are left. Suites run
# AMP_GPU_JOBS (default 4) at a time; the bench runs alone.
#
# Environment: OUT, AMP_GPU_BUDGET_S, AMP_GPU_JOBS, AMP_GPU_PYTHON (python3
# with torch, default python3), LIBTORCH_LIB (libtorch's lib directory,
# instead of asking torch), AMP_PROPTEST_CASES (cases per GPU-vs-CPU
# property, default 32 here), AMP_GPU_SEEDS (main-job seeds, default 3).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${1:-gpu-bundle}
[[ $BUNDLE = /* ]] || BUNDLE=$PWD/$BUNDLE
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" || { echo "gpu-check: cannot create $OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.md
BUDGET=${AMP_GPU_BUDGET_S:-420}
JOBS=${AMP_GPU_JOBS:-4}
PY=${AMP_GPU_PYTHON:-python3}
export AMP_PROPTEST_CASES=${AMP_PROPTEST_CASES:-32}
SEEDS=${AMP_GPU_SEEDS:-3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/amp-gpu.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT

log() { printf '[gpu-check %4ss] %s\n' "$SECONDS" "$*" >&2; }
left() { echo $((BUDGET - SECONDS)); }

# Ends the run with a summary saying why nothing ran.
stop() {
  local status=$1 line=$2
  log "$line"
  {
    echo "# amp GPU check"
    echo
    echo "$line"
  } >"$SUMMARY"
  exit "$status"
}

# 1. Is there a GPU? (No GPU is not an error: the check skips cleanly.)
gpu_info=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_info=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv,noheader 2>/dev/null || true)
fi
if [[ -z $gpu_info ]]; then
  why="nvidia-smi not found or lists no GPU"
  compgen -G '/dev/nvidia[0-9]*' >/dev/null && why="nvidia-smi lists no GPU, though /dev/nvidia* exists"
  stop 0 "no GPU found: skipping the GPU check ($why)"
fi
log "GPU: $gpu_info"

# 2. The bundle.
[[ -f $BUNDLE/bin.tar.xz && -f $BUNDLE/MANIFEST ]] \
  || stop 1 "FAILED: no bundle at $BUNDLE (build it with bash scripts/gpu-bundle.sh, then carry that folder here)"
if command -v xz >/dev/null 2>&1; then
  tar -C "$WORK" -xJf "$BUNDLE/bin.tar.xz"
else
  "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    "$BUNDLE/bin.tar.xz" "$WORK"
fi || stop 1 "FAILED: cannot unpack $BUNDLE/bin.tar.xz"
BIN=$WORK/bin
(cd "$BIN" && sed -n '/^binaries/,$p' "$BUNDLE/MANIFEST" | tail -n +2 | sha256sum -c --quiet -) \
  || stop 1 "FAILED: the binaries do not match $BUNDLE/MANIFEST"

# 3. The libraries: libtorch and the nvidia-* wheels of this machine's
# torch; the driver's libcuda.so.1 from the system.
if [[ -z ${LIBTORCH_LIB:-} ]]; then
  LIBTORCH_LIB=$(timeout 120 "$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) \
    || stop 1 "FAILED: $PY cannot import torch (set AMP_GPU_PYTHON to a python3 with torch $(
      sed -n 's/^libtorch: torch \([^ ]*\).*/\1/p' "$BUNDLE/MANIFEST"), or LIBTORCH_LIB)"
fi
[[ -f $LIBTORCH_LIB/libtorch.so ]] || stop 1 "FAILED: no libtorch.so in $LIBTORCH_LIB"
site=$(dirname "$(dirname "$LIBTORCH_LIB")")
nvidia_libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | sort | paste -sd: -)
export LD_LIBRARY_PATH=$LIBTORCH_LIB${nvidia_libs:+:$nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
missing=$(for b in "$BIN"/*; do ldd "$b" 2>/dev/null | grep 'not found'; done | sort -u)
[[ -z $missing ]] || stop 1 "FAILED: libraries not found by the binaries:
$missing
(LD_LIBRARY_PATH=$LD_LIBRARY_PATH; the bundle $(grep '^needs:' "$BUNDLE/MANIFEST"); here: $(ldd --version 2>&1 | head -n 1))"
torch_version=$(timeout 120 "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "?")
log "libtorch: $LIBTORCH_LIB (torch $torch_version)"

# 4. Suites: name, working directory (the package root, as cargo test would
# use), timeout in seconds, command. Filters run only the CUDA legs of the
# facade's suites (their CPU legs run in every CI build). The link test that
# runs its binary without LD_LIBRARY_PATH is left out: the bundle is made to
# run with the library path set here.
SUITES=(
  "tch-store|amp-tch|90|$BIN/amp-tch--store"
  "tch-autograd|amp-tch|120|$BIN/amp-tch--autograd"
  "tch-oracle|amp-tch|120|$BIN/amp-tch--oracle"
  "tch-link|amp-tch|60|$BIN/amp-tch--link --exact tiny_tch_op"
  "candle-store|amp-candle|90|$BIN/amp-candle--store"
  "candle-cuda|amp-candle|150|$BIN/amp-candle--cuda"
  "candle-nccl|amp-candle|120|$BIN/amp-candle--nccl --nocapture"
  "gpu-vs-cpu-tch|.|240|$BIN/amp--tch tch_cuda"
  "gpu-vs-cpu-candle|.|240|$BIN/amp--candle candle_cuda"
  "train-candle-cuda|.|150|$BIN/train --backend candle --device cuda --seeds $SEEDS --quiet --out-dir $LOGS/train-candle"
  "train-tch-cuda|.|150|$BIN/train --backend tch --device cuda --seeds $SEEDS --quiet --out-dir $LOGS/train-tch"
)
BENCH_RESERVE=200

# Runs one suite under its timeout; writes "status passed failed skipped
# seconds" to $LOGS/<name>.res. Test binaries report through libtest's
# "test result" lines; a skipped CUDA part through a SKIPPED line. Output
# goes to $LOGS/<name>.log, or, with a fifth argument, stdout to that file
# and stderr to the log.
run_suite() {
  local name=$1 dir=$2 limit=$3 cmd=$4 log=$LOGS/$1.log stdout=${5:-} start rc status counts
  start=$SECONDS
  # shellcheck disable=SC2086 # the command line is split on purpose
  if [[ -n $stdout ]]; then
    (cd "$ROOT/$dir" && timeout -k 10 "$limit" $cmd) >"$stdout" 2>"$log"
  else
    stdout=/dev/null
    (cd "$ROOT/$dir" && timeout -k 10 "$limit" $cmd) >"$log" 2>&1
  fi
  rc=$?
  counts=$(cat "$log" "$stdout" 2>/dev/null | awk '
    /^test result:/ { for (i = 1; i < NF; i++) {
                        if ($(i + 1) ~ /^passed/) p += $i
                        if ($(i + 1) ~ /^failed/) f += $i } }
    /SKIPPED/ { s++ }
    END { printf "%d %d %d", p, f, s }')
  read -r passed failed skipped <<<"$counts"
  if ((rc == 124 || rc == 137)); then
    status="FAIL(timeout-${limit}s)"
  elif ((rc != 0)); then
    status="FAIL(exit-$rc)"
  elif ((skipped > 0)); then
    status="FAIL(CUDA-skipped)"
  else
    status="pass"
  fi
  echo "$status $passed $failed $skipped $((SECONDS - start))" >"$LOGS/$name.res"
}

log "running ${#SUITES[@]} suites, $JOBS at a time, AMP_PROPTEST_CASES=$AMP_PROPTEST_CASES"
active=0
for suite in "${SUITES[@]}"; do
  IFS='|' read -r name dir limit cmd <<<"$suite"
  room=$(($(left) - BENCH_RESERVE))
  if ((room < 20)); then
    echo "FAIL(no time left) 0 0 0 0" >"$LOGS/$name.res"
    continue
  fi
  ((limit > room)) && limit=$room
  if ((active >= JOBS)); then
    wait -n
    active=$((active - 1))
  fi
  log "start $name (timeout ${limit}s)"
  out=""
  [[ $name == train-* ]] && out=$LOGS/$name.out
  run_suite "$name" "$dir" "$limit" "$cmd" "$out" &
  active=$((active + 1))
done
wait

# 5. The bench, alone on the GPU.
room=$(($(left) - 15))
bench_args=()
((room < BENCH_RESERVE)) && bench_args=(--quick)
((room < 30)) && room=30
log "gpu_bench ${bench_args[*]} (timeout ${room}s)"
run_suite bench . "$room" "$BIN/gpu_bench ${bench_args[*]}" "$OUT/bench.txt"

# 6. Summary.
fails=0
{
  echo "# amp GPU check"
  echo
  echo "- GPU: $gpu_info"
  echo "- libtorch: $LIBTORCH_LIB (torch $torch_version)"
  echo "- bundle: $(sed -n 's/^commit: //p' "$BUNDLE/MANIFEST"), $(sed -n 's/^cuda: //p' "$BUNDLE/MANIFEST")"
  echo "- AMP_PROPTEST_CASES=$AMP_PROPTEST_CASES, main job with $SEEDS seeds; took ${SECONDS} s"
  echo
  echo "| suite | status | passed | failed | skipped | seconds |"
  echo "|---|---|---|---|---|---|"
  for suite in "${SUITES[@]}" "bench|"; do
    name=${suite%%|*}
    read -r status passed failed skipped secs <"$LOGS/$name.res" 2>/dev/null \
      || { status="FAIL(no result)"; passed=0; failed=0; skipped=0; secs=0; }
    [[ $status == pass ]] || fails=$((fails + 1))
    echo "| $name | $status | $passed | $failed | $skipped | $secs |"
  done
  echo
  echo "## GPU bench"
  echo '```'
  cat "$OUT/bench.txt"
  echo '```'
  for b in candle tch; do
    echo
    echo "## Main job, $b on CUDA"
    echo '```'
    cat "$LOGS/train-$b-cuda.out" 2>/dev/null
    tail -n 5 "$LOGS/train-$b-cuda.log" 2>/dev/null
    echo '```'
  done
  echo
  ((fails == 0)) && echo "RESULT: every suite passed" || echo "RESULT: $fails suite(s) failed; logs.tar.gz has their output"
} >"$SUMMARY"
cat "$LOGS"/train-*.out >"$OUT/train.txt" 2>/dev/null
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
cat "$SUMMARY"
((fails == 0))
