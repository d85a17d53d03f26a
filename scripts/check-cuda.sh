#!/usr/bin/env bash
# Compile-checks amp-candle's `cuda` feature on a machine without a GPU.
#
# What it does, non-interactively, failing (non-zero exit) at the first error:
#  1. Installs the CUDA 13.0 compiler and libraries from PyPI (pinned wheels,
#     the versions in docs/toolchain.md) into a venv in a cache directory
#     outside the clone, reusing it when its pin list matches.
#  2. Builds a CUDA root of links into those wheels (bin, include, lib,
#     lib64 -> lib, nvvm, unversioned lib*.so) and points CUDA_ROOT at it.
#  3. Builds the library (`cargo build -p amp-candle --features cuda --lib`):
#     nvcc compiles candle's kernels and cudarc is compiled, not linked.
#  4. Generates a stub libcuda.so (SONAME libcuda.so.1) exporting every
#     driver-API symbol (cu[A-Z]*) that the compiled code leaves undefined;
#     no wheel ships libcuda, which comes with the driver. Each stub returns
#     CUDA_ERROR_NO_DEVICE (100), so a binary run against it behaves like a
#     machine whose driver sees no GPU.
#  5. Compiles and links every target of the crate with the feature
#     (`cargo test -p amp-candle --features cuda --all-targets --no-run`):
#     `cargo check` would type-check our `cfg(feature = "cuda")` code but not
#     the link, which is where a missing or renamed CUDA symbol shows up.
#  6. Runs the cuda build's device-selection tests against the stub (the
#     "no GPU usable" path must give a clear error or the CPU, never a
#     panic), unless AMP_CUDA_SKIP_RUN=1.
#
# Environment:
#   AMP_CUDA_CACHE   cache directory (default ${XDG_CACHE_HOME:-~/.cache}/amp-cuda);
#                    deleting it only costs time: everything is rebuilt.
#   PYTHON           python3 used to create the venv (default python3).
#   CARGO_TARGET_DIR target directory of the cuda build (default
#                    $AMP_CUDA_CACHE/target: kept apart from the workspace's
#                    own target so the CPU build and this one never wait on
#                    each other's lock, and reused by later runs, even from a
#                    fresh clone; cargo's fingerprints make a stale cache safe).
#   AMP_CUDA_SKIP_RUN=1 stops after step 5.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${AMP_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/amp-cuda}
PYTHON=${PYTHON:-python3}
VENV=$CACHE/venv
CUDA=$CACHE/cuda-13.0

# CUDA 13.0: the GPU machine's driver is 13.0, and cudarc 0.19 rejects nvcc
# newer than 13.4. Exact pins so that every run builds against the same bits.
PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.0.2.14
)

log() { printf '[check-cuda %5ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v cargo >/dev/null || die "cargo not found"
command -v cc >/dev/null || die "a C compiler (cc) is needed for the stub libcuda"
command -v nm >/dev/null || die "nm (binutils) is needed to find the symbols to stub"
mkdir -p "$CACHE"

# 1. The venv, reused when it holds exactly these pins.
stamp=$(printf '%s\n' "${PINS[@]}")
if [[ -x $VENV/bin/python && -f $VENV/.amp-pins && "$(cat "$VENV/.amp-pins")" == "$stamp" ]]; then
  log "reusing $VENV"
else
  log "installing CUDA 13.0 wheels into $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-input "${PINS[@]}"
  printf '%s\n' "$stamp" >"$VENV/.amp-pins"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
WHEELS=$SITE/nvidia/cu13
[[ -x $WHEELS/bin/nvcc ]] || die "nvcc missing under $WHEELS/bin"

# 2. A CUDA root of links into the wheels (rebuilt every run: it is cheap).
rm -rf "$CUDA"
mkdir -p "$CUDA/lib/stubs"
for dir in bin include nvvm; do
  ln -s "$WHEELS/$dir" "$CUDA/$dir"
done
for lib in "$WHEELS"/lib/*; do
  ln -s "$lib" "$CUDA/lib/"
done
ln -s lib "$CUDA/lib64"
# Unversioned names for the linker (libcublas.so -> libcublas.so.13, ...).
for lib in "$WHEELS"/lib/lib*.so.*; do
  base=${lib##*/}
  plain=${base%%.so.*}.so
  [[ -e $CUDA/lib/$plain ]] || ln -s "$base" "$CUDA/lib/$plain"
done

export CUDA_ROOT=$CUDA CUDA_PATH=$CUDA CUDA_HOME=$CUDA
export PATH=$CUDA/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
log "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"

cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
TARGET=$CARGO_TARGET_DIR

# 3. Compile the library with the feature: no link step yet.
log "cargo build -p amp-candle --features cuda --lib"
cargo build --locked -p amp-candle --features cuda --lib

# 4. Stub libcuda from the driver symbols left undefined by the compiled
# code of cudarc and of the crates that instantiate its generics (candle,
# amp-candle). Stale rlibs of older builds only add symbols: harmless.
shopt -s nullglob
rlibs=("$TARGET"/debug/deps/lib{cudarc,candle_core,candle_nn,amp_candle}-*.rlib)
shopt -u nullglob
((${#rlibs[@]})) || die "no cudarc or candle rlib under $TARGET/debug/deps"
symbols=$(for rlib in "${rlibs[@]}"; do nm -u "$rlib" 2>/dev/null || true; done \
  | awk '{print $NF}' | grep -E '^cu[A-Z][A-Za-z0-9_]*$' | sort -u)
count=$(printf '%s\n' "$symbols" | grep -c . || true)
((count > 0)) || die "found no driver symbols to stub"
stub_c=$CUDA/lib/stubs/libcuda-stub.c
{
  echo '/* Generated by scripts/check-cuda.sh: link-time stand-in for the CUDA'
  echo '   driver. Every entry point reports CUDA_ERROR_NO_DEVICE (100). */'
  for sym in $symbols; do
    printf 'int %s(void) { return 100; }\n' "$sym"
  done
} >"$stub_c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so.1" "$stub_c"
ln -s libcuda.so.1 "$CUDA/lib/stubs/libcuda.so"
log "stub libcuda.so.1 with $count driver symbols"

# 5. Compile and link every target (tests, examples) with the feature.
log "cargo test -p amp-candle --features cuda --all-targets --no-run"
cargo test --locked -p amp-candle --features cuda --all-targets --no-run \
  || die "build or link failed; an 'undefined reference to cu...' means a driver symbol the stub lacks"

# 6. Run the device-selection tests of the cuda build against the stub.
if [[ ${AMP_CUDA_SKIP_RUN:-0} != 1 ]]; then
  log "running the cuda build's device tests against the stub driver"
  LD_LIBRARY_PATH=$CUDA/lib/stubs:$CUDA/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    cargo test --locked -p amp-candle --features cuda --test store --test cuda \
    -- device --nocapture
fi
log "ok: the cuda feature compiles and links"
