#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace.
#
# - libtorch for amp-tch: PyPI's torch wheel (pinned to the version tch
#   expects) in a project-local virtualenv, .venv, created when missing;
# - nvcc and the CUDA 13.0 libraries from PyPI, cached outside the clone
#   (scripts/cuda-env.sh), for the GPU bundle;
# - Open MPI (mpirun, headers) and libclang for amp-mpi, from Debian's
#   packages (apt-get, as root or through sudo), when missing.
# Then: formatting, clippy, the whole test suite with every CPU backend
# (ndarray, candle, tch), the GPU bundle (scripts/gpu-bundle.sh: every CUDA
# target compiled and linked against a stand-in for the driver, the
# device-selection tests run against it, the binaries packed into
# gpu-bundle/ within 60 MiB), and that scripts/gpu-check.sh skips cleanly on
# a machine without a GPU. CUDA tests skip with a printed notice on machines
# without a GPU; on a GPU machine, scripts/gpu-check.sh runs the bundle.
#
# Environment: AMP_VENV (virtualenv path, default .venv),
# AMP_PROPTEST_CASES (cases per property, default 128),
# AMP_SKIP_CUDA_CHECK=1 to leave out the GPU bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
torch_version=2.11.0
venv=${AMP_VENV:-$root/.venv}

step() { printf '\n==> %s\n' "$*"; }

# A cold run writes about 15 GB (build outputs 2.5, the virtualenv 4.6, the
# CUDA cache 8); say so up front rather than failing on a full disk halfway
# through.
free_kb=$(df -Pk "$root" | awk 'NR == 2 { print $4 }')
if [ "${free_kb:-0}" -lt $((15 * 1024 * 1024)) ]; then
    printf 'warning: %s GB free under %s; a cold run needs about 15 GB\n' \
        "$((free_kb / 1024 / 1024))" "$root" >&2
fi
# Build outputs of a one-off run are never reused incrementally.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi

# amp-mpi: the MPI library and its launcher, and libclang for the bindings
# the mpi crate generates at build time.
if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null ||
    ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
    step "installing Open MPI and libclang (Debian packages)"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q || true
    $sudo apt-get install -y -q libopenmpi-dev openmpi-bin libclang-dev
fi

if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
    step "installing torch==$torch_version into $venv (about a minute, 4.6 GB)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_version"
fi
# torch-sys finds libtorch by running `python` from the active virtualenv.
export VIRTUAL_ENV=$venv PATH="$venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1

# Every CPU backend, MPI and burn, in the facade and in the measuring
# harness (amp-bench) alike.
features=amp/tch,amp/mpi,amp/burn,amp-bench/tch,amp-bench/mpi,amp-bench/burn

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, every CPU backend, MPI, burn)"
cargo clippy --workspace --all-targets --features "$features" -- -D warnings

step "cargo test (every crate, every CPU backend, MPI, burn)"
cargo test --workspace --features "$features"

step "the main job data-parallel: mpirun -np 2, four epochs"
cargo build --workspace --profile test --example train --features "$features"
table=$(mpirun --allow-run-as-root --oversubscribe --timeout 300 -np 2 \
    target/debug/examples/train --seeds 1 --epochs 4 --quiet)
printf '%s\n' "$table"
grep -q ", 2 ranks:" <<<"$table"

step "burn's wgpu backend compile-checked (amp-burn --features wgpu)"
cargo check -p amp-burn --features wgpu

step "PyTorch reference of bench_report: self-check against algorithm.md"
"$venv/bin/python" scripts/torch_reference.py --self-check

if [ "${AMP_SKIP_CUDA_CHECK:-0}" != 1 ]; then
    step "GPU bundle: every CUDA target built and linked, packed within 60 MiB"
    bash scripts/gpu-bundle.sh gpu-bundle
fi
if ! command -v nvidia-smi >/dev/null; then
    step "gpu-check.sh without a GPU skips cleanly"
    results=$(mktemp -d)
    OUT=$results bash scripts/gpu-check.sh gpu-bundle
    grep -q "no GPU found: skipping" "$results/summary.md"
    rm -rf "$results"
fi
step "all tests passed"
