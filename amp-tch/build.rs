//! Build script of amp-tch.
//!
//! 1. Links this package's binaries, tests, examples and doctests so that they
//!    start without `LD_LIBRARY_PATH` and load libtorch's CUDA part:
//!    RUNPATH to the libtorch directory, and `libtorch.so` kept as a needed
//!    library despite the linker's `--as-needed` (libtorch.so is what pulls in
//!    libtorch_cuda.so; nothing in a Rust binary references it directly).
//!    Cargo applies `rustc-link-arg` only to the package that emits it, so
//!    every package with tch binaries needs the same lines; see
//!    [`emit_torch_link_args`].
//! 2. Compiles the C++ shim (`shim/`), which calls ATen's multi-tensor
//!    `_foreach_*` operators that tch 0.24 does not bind, against the headers
//!    of the same libtorch that torch-sys links, and holds the plain loops of
//!    the CPU loop path (compiled with `-O3 -ffp-contract=off`).
//! 3. Re-exports the libtorch directory as `DEP_AMP_TCH_LIBTORCH_LIB` (this
//!    package declares `links = "amp_tch"`) for the build scripts of packages
//!    that depend on amp-tch but not on torch-sys directly.

use std::env;
use std::path::{Path, PathBuf};

/// The link arguments every package with tch binaries needs (copy this
/// function into such a package's `build.rs`, with `lib_dir` taken from
/// `DEP_TCH_LIBTORCH_LIB` or `DEP_AMP_TCH_LIBTORCH_LIB`).
fn emit_torch_link_args(lib_dir: &Path) {
    let lib_dir = lib_dir.display();
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
    println!("cargo:rustc-link-arg=-L{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

/// `_GLIBCXX_USE_CXX11_ABI` of the libtorch build: the shim must use the same
/// std::string layout. PyPI wheels of torch ≥ 2.7 use the new ABI; detect it
/// from libc10.so's symbols unless `AMP_TCH_CXX11_ABI` says otherwise.
fn cxx11_abi(lib_dir: &Path) -> &'static str {
    println!("cargo:rerun-if-env-changed=AMP_TCH_CXX11_ABI");
    if let Ok(value) = env::var("AMP_TCH_CXX11_ABI") {
        return if value.trim() == "0" { "0" } else { "1" };
    }
    match std::fs::read(lib_dir.join("libc10.so")) {
        Ok(bytes) => {
            let needle = b"St7__cxx11";
            if bytes.windows(needle.len()).any(|w| w == needle) {
                "1"
            } else {
                "0"
            }
        }
        Err(_) => "1",
    }
}

/// The shim's translation units (their headers are in the same folder).
const SHIM_SOURCES: [&str; 5] = [
    "shim/ops.cpp",
    "shim/grads.cpp",
    "shim/flat.cpp",
    "shim/sgd.cpp",
    "shim/adam.cpp",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim");
    let Ok(lib_dir) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        // torch-sys only sets it on Linux and macOS builds that found libtorch;
        // without it neither the shim nor the link arguments can be made.
        panic!(
            "DEP_TCH_LIBTORCH_LIB is not set: build with libtorch from the project \
             virtualenv (`source .venv/bin/activate && export LIBTORCH_USE_PYTORCH=1`)"
        );
    };
    let lib_dir = PathBuf::from(lib_dir);
    println!("cargo:libtorch_lib={}", lib_dir.display());
    // For the link test, which checks the RUNPATH of its own executable.
    println!("cargo:rustc-env=AMP_TCH_LIBTORCH_LIB={}", lib_dir.display());

    let target = env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        emit_torch_link_args(&lib_dir);
    } else if !target.contains("windows") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    }

    let root = lib_dir.parent().unwrap_or(&lib_dir).to_path_buf();
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .std("c++17")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi(&lib_dir))
        .define("GLOG_USE_GLOG_EXPORT", None)
        // -O3 vectorises the plain loops of the CPU loop path; -ffp-contract=off
        // keeps `d + a * s` a separate multiply and add (no FMA), as the
        // reference store computes it.
        .opt_level(3)
        .flag_if_supported("-ffp-contract=off")
        // ATen's parallel_for is OpenMP inline code in PyTorch's builds.
        .flag("-fopenmp")
        .files(SHIM_SOURCES)
        .compile("amp_tch_shim");
    link_openmp(&lib_dir);
}

/// Links the OpenMP runtime the shim's `#pragma omp` code calls: the one
/// libtorch itself loads (PyPI wheels ship `libgomp.so.1`, libtorch archives
/// a `libgomp-<hash>.so.1`), so that a process holds one OpenMP runtime and
/// one thread pool; the system's `libgomp` where libtorch has none.
fn link_openmp(lib_dir: &Path) {
    let bundled = std::fs::read_dir(lib_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("libgomp") && name.ends_with(".so.1"))
        .min_by_key(|name| (name != "libgomp.so.1", name.clone()));
    match bundled {
        Some(name) => {
            println!("cargo:rustc-link-search=native={}", lib_dir.display());
            println!("cargo:rustc-link-lib=dylib:+verbatim={name}");
        }
        None => println!("cargo:rustc-link-lib=dylib=gomp"),
    }
}
