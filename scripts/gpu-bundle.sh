#!/usr/bin/env bash
# Builds the GPU bundle: every CUDA test binary, the main job and the GPU
# bench, in release, for compute capability 9.0 (Hopper) by default, packed
# into one folder that scripts/gpu-check.sh runs on any CUDA machine.
#
#   bash scripts/gpu-bundle.sh [DIR]        # default DIR: gpu-bundle (git-ignored)
#
# No GPU is needed here. What it does, failing at the first error:
#  1. The CUDA 13.0 toolchain from PyPI and a CUDA root of links to it
#     (scripts/cuda-env.sh); libtorch from the project virtualenv's torch
#     wheel (AMP_VENV, default .venv; scripts/test.sh creates it).
#  2. Writes a stub libcuda for the link, exporting every driver function
#     that cudarc's bindings declare (the driver's own libcuda.so.1 is loaded
#     at run time), and likewise a stub libnccl (the nvidia-nccl wheel's
#     libnccl.so.2 is loaded at run time).
#  3. Builds, in one cargo invocation with debug info stripped, the test
#     binaries with CUDA tests: amp-tch's store, autograd, oracle and link
#     tests, amp-candle's (`cuda` and `nccl` features) cuda, nccl and store
#     tests, the facade's
#     tch and candle suites (whose CUDA tests hold the GPU-vs-CPU agreement
#     properties); the main job (example `train`) and amp-bench's
#     `gpu_bench` program. amp-candle's
#     other targets (its autograd and oracle tests, the `candle_mlp`
#     example) are compiled and linked with the `cuda` feature too, so that
#     every target of the crate links against the driver's API, but not
#     packed. This is the CUDA compile-and-link check of
#     `bash scripts/test.sh`.
#  4. Runs the cuda build's device-selection tests against the stub driver
#     (no GPU usable must give a clear error or the CPU, never a panic; NCCL
#     refuses a CPU device and a missing library with an error),
#     unless AMP_CUDA_SKIP_RUN=1.
#  5. Packs the binaries into DIR/bin.tar.xz with DIR/MANIFEST (what was
#     built from what, sha256 of every binary) and fails when DIR is larger
#     than AMP_BUNDLE_MAX_MIB (default 60): the bundle must travel to a GPU
#     machine in at most 64 MiB.
#
# Environment: AMP_VENV, AMP_CUDA_CACHE (see cuda-env.sh), CARGO_TARGET_DIR
# (default $AMP_CUDA_CACHE/target, kept apart from the workspace's target and
# reused by later runs, even from a fresh clone), CUDA_COMPUTE_CAP (default
# 90), AMP_BUNDLE_MAX_MIB, AMP_CUDA_SKIP_RUN.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=${1:-gpu-bundle}
MAX_MIB=${AMP_BUNDLE_MAX_MIB:-60}
VENV_TORCH=${AMP_VENV:-$ROOT/.venv}

log() { printf '[gpu-bundle %5ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in cargo xz tar sha256sum python3 objdump; do
  command -v "$tool" >/dev/null || die "$tool not found"
done

# 1. Toolchains.
# shellcheck source=scripts/cuda-env.sh
source "$ROOT/scripts/cuda-env.sh"
cuda_env_setup || die "CUDA toolchain setup failed"
if ! "$VENV_TORCH/bin/python" -c 'import torch' 2>/dev/null; then
  die "no torch in $VENV_TORCH (run scripts/test.sh once, or set AMP_VENV)"
fi
# torch-sys only checks that LIBTORCH_USE_PYTORCH is set, and reruns its
# build script only when that value changes: naming the venv in it keeps the
# shared target directory below from reusing the libtorch paths of another
# checkout's venv (which may have been deleted since).
export VIRTUAL_ENV=$VENV_TORCH PATH="$VENV_TORCH/bin:$PATH" LIBTORCH_USE_PYTORCH=$VENV_TORCH
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo
PACKAGES=(-p amp -p amp-tch -p amp-candle -p amp-bench)
FEATURES=amp/tch,amp/cuda,amp/nccl,amp-candle/cuda,amp-candle/nccl,amp-bench/tch,amp-bench/cuda

# 2. The stub driver, from the driver bindings of the cudarc that
# Cargo.lock pins (read before anything is built, so that the whole build is
# one cargo invocation with one feature resolution).
cudarc=$(cargo metadata --locked --format-version 1 --all-features | python3 -c '
import json, os, sys
found = [p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
print(os.path.dirname(found[0]) if found else "")') || die "cargo metadata failed"
[[ -n $cudarc && -f $cudarc/src/driver/sys/mod.rs ]] || die "cudarc's driver bindings not found"
cuda_stub_libcuda "$cudarc"/src/driver/sys/*.rs || die "cannot make the stub libcuda"
cuda_stub_libnccl "$cudarc"/src/nccl/sys/*.rs || die "cannot make the stub libnccl"
STUBS=$CUDA/lib/stubs

# 3. Test binaries and examples, one invocation; the JSON messages name the
# executables.
TESTS=(--test store --test autograd --test oracle --test link --test cuda --test nccl --test tch --test candle)
EXAMPLES=(--example train --example candle_mlp --bin gpu_bench)
log "cargo build --release ${TESTS[*]} ${EXAMPLES[*]}"
json=$(mktemp)
trap 'rm -f "$json"' EXIT
cargo build --release --locked "${PACKAGES[@]}" --features "$FEATURES" \
  "${TESTS[@]}" "${EXAMPLES[@]}" --message-format=json-render-diagnostics >"$json" \
  || die "build or link failed; an 'undefined reference to cu...' means a driver symbol the stub lacks"

# name<TAB>path per binary: <package>--<target> for tests, the program's
# name for examples and binaries. (amp-candle's autograd and oracle tests are built, as
# target names select them in every package, but run on the CPU only; so is
# the candle_mlp example.)
list=$(python3 - "$json" "$ROOT" <<'PY'
import json, os, sys
root = sys.argv[2]
keep = {  # package: (its manifest, the targets to keep)
    "amp-tch": (os.path.join(root, "amp-tch", "Cargo.toml"), {"store", "autograd", "oracle", "link"}),
    "amp-candle": (os.path.join(root, "amp-candle", "Cargo.toml"), {"cuda", "nccl", "store"}),
    "amp": (os.path.join(root, "Cargo.toml"), {"tch", "candle", "train"}),
    "amp-bench": (os.path.join(root, "amp-bench", "Cargo.toml"), {"gpu_bench"}),
}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    manifest = os.path.realpath(m.get("manifest_path", ""))
    name = next((p for p, (path, _) in keep.items() if os.path.realpath(path) == manifest), None)
    target, kind = m["target"]["name"], m["target"]["kind"]
    if name is None or target not in keep[name][1]:
        continue
    if "example" in kind or "bin" in kind:
        print(f"{target}\t{m['executable']}")
    elif m["profile"]["test"]:
        print(f"{name}--{target}\t{m['executable']}")
PY
)
count=$(printf '%s\n' "$list" | grep -c . || true)
((count == 11)) || die "expected 9 test binaries and 2 examples, found $count:
$list"

# 4. The device-selection tests against the stub driver.
if [[ ${AMP_CUDA_SKIP_RUN:-0} != 1 ]]; then
  log "device-selection tests of the cuda build against the stub driver"
  candle_store=$(printf '%s\n' "$list" | awk -F'\t' '$1 == "amp-candle--store" {print $2}')
  candle_cuda=$(printf '%s\n' "$list" | awk -F'\t' '$1 == "amp-candle--cuda" {print $2}')
  candle_nccl=$(printf '%s\n' "$list" | awk -F'\t' '$1 == "amp-candle--nccl" {print $2}')
  for bin in "$candle_store" "$candle_cuda" "$candle_nccl"; do
    (cd amp-candle && LD_LIBRARY_PATH=$STUBS:$CUDA/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
      "$bin" device --nocapture) || die "device tests of $bin failed against the stub"
  done
fi

# 5. Pack.
stage=$(mktemp -d)
trap 'rm -f "$json"; rm -rf "$stage"' EXIT
mkdir -p "$stage/bin"
while IFS=$'\t' read -r name path; do
  cp "$path" "$stage/bin/$name"
done <<<"$list"
rm -rf "$DEST"
mkdir -p "$DEST"
torch_version=$("$VENV_TORCH/bin/python" -c 'import torch; print(torch.__version__)')
{
  echo "amp GPU bundle: run it with  bash scripts/gpu-check.sh $DEST"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), glibc $(ldd --version | head -n 1 | awk '{print $NF}')"
  echo "libtorch: torch $torch_version (run against the GPU machine's own torch of the same version)"
  echo "cuda: $(nvcc --version | tail -n 2 | head -n 1), compute capability $CUDA_COMPUTE_CAP"
  echo "needs: $(for b in "$stage"/bin/*; do objdump -T "$b" 2>/dev/null; done \
    | grep -oE 'GLIBC(XX)?_[0-9.]+' | sort -Vu | awk -F_ '{top[$1] = $0} END {print top["GLIBC"], top["GLIBCXX"]}')"
  echo "binaries (sha256, name):"
  (cd "$stage/bin" && sha256sum -- *)
} >"$DEST/MANIFEST"
raw=$(du -sm "$stage/bin" | cut -f1)
log "compressing $count binaries ($raw MiB)"
# Every candle binary embeds the same ~40 MB of compiled kernels: with the
# binaries in name order (the candle ones close together) and a dictionary
# larger than three binaries, xz stores those kernels about once.
tar -C "$stage" --sort=name -cf - bin | xz -T2 --lzma2=preset=9,dict=192MiB >"$DEST/bin.tar.xz"
size=$(du -sm "$DEST" | cut -f1)
bytes=$(du -sb "$DEST" | cut -f1)
log "bundle $DEST: $bytes bytes (${size} MiB; $raw MiB unpacked), limit $MAX_MIB MiB"
((bytes <= MAX_MIB * 1024 * 1024)) || die "bundle is larger than $MAX_MIB MiB"
log "ok: bash scripts/gpu-check.sh $DEST runs it on a CUDA machine"
