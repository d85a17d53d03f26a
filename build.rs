//! Build script of the `amp` facade package, and of `amp-bench`.
//!
//! With the `tch` feature, the package's own examples, benches and tests link
//! libtorch through amp-tch, and cargo applies amp-tch's `rustc-link-arg`
//! lines only to amp-tch's targets. Re-emit them here (RUNPATH to libtorch,
//! `libtorch.so` kept as a needed library) so that
//! `cargo run --example … --features tch` starts without `LD_LIBRARY_PATH`
//! and sees CUDA when there is one. Without the feature this does nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_AMP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_AMP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
        println!("cargo:rustc-link-arg=-L{lib_dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    } else if !target.contains("windows") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
}
