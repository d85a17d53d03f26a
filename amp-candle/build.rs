//! Build script of amp-candle. With the `cuda` feature it compiles
//! `kernels/in_place.cu` (the CUDA side of the in-place operations) to PTX
//! with nvcc, into `$OUT_DIR/in_place.ptx`, which the crate embeds. Without
//! the feature it does nothing.
//!
//! nvcc is taken from `NVCC`, else from `bin/` of `CUDA_ROOT`, `CUDA_PATH`
//! or `CUDA_HOME`, else from `PATH`; the PTX targets the virtual
//! architecture `compute_$CUDA_COMPUTE_CAP` (as candle's own kernels do),
//! else that of the GPU `nvidia-smi` reports, else `compute_75`.
//! `--fmad=false` keeps every multiplication and addition apart, as on the
//! CPU, so that a kernel gives the bits of the CPU loop it mirrors.
//!
//! It also writes `$OUT_DIR/kernels.rs`: one constant per `KERNEL(name)`
//! line of the source, holding the name, so that the crate names each
//! kernel through a constant and a name missing from the source fails to
//! compile.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "kernels/in_place.cu";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={SOURCE}");
    for var in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_COMPUTE_CAP",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("in_place.ptx");
    let nvcc = nvcc();
    let arch = format!("-arch=compute_{}", compute_cap());
    write_names(&out.join("kernels.rs"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "--fmad=false", "-O3", "-std=c++17", &arch, "-o"])
        .arg(&ptx)
        .arg(SOURCE)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{nvcc} failed on {SOURCE} ({status})"),
        Err(err) => panic!(
            "cannot run {nvcc} ({err}): the `cuda` feature needs the CUDA toolkit's nvcc \
             (set NVCC or CUDA_ROOT, or put it on PATH; scripts/cuda-env.sh sets one up)"
        ),
    }
}

/// The nvcc to run.
fn nvcc() -> String {
    if let Ok(nvcc) = std::env::var("NVCC") {
        return nvcc;
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Ok(root) = std::env::var(var) {
            let candidate = PathBuf::from(root).join("bin").join("nvcc");
            if candidate.is_file() {
                return candidate.display().to_string();
            }
        }
    }
    "nvcc".to_string()
}

/// The compute capability the PTX targets, as digits (`90` for 9.0).
fn compute_cap() -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        let cap = cap.trim().replace('.', "");
        if !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit()) {
            return cap;
        }
        panic!("CUDA_COMPUTE_CAP={cap:?} is not a compute capability such as 90 or 8.6");
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output();
    if let Ok(out) = smi {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(first) = text.lines().next() {
            let cap = first.trim().replace('.', "");
            if out.status.success() && !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit()) {
                return cap;
            }
        }
    }
    "75".to_string()
}

/// Writes one `pub(crate) const NAME: [&str; 2]` (the names of the f32 and
/// f64 kernels) per `KERNEL(name)` line of the kernel source.
fn write_names(path: &std::path::Path) {
    let source = std::fs::read_to_string(SOURCE).expect("kernels/in_place.cu is readable");
    let mut names = String::new();
    for line in source.lines() {
        let Some(name) = line
            .trim()
            .strip_prefix("KERNEL(")
            .and_then(|l| l.strip_suffix(')'))
        else {
            continue;
        };
        names.push_str(&format!(
            "/// The f32 and f64 kernels of `{name}` in `kernels/in_place.cu`.\n\
             pub(crate) const {}: [&str; 2] = [\"amp_{name}_f32\", \"amp_{name}_f64\"];\n",
            name.to_uppercase()
        ));
    }
    assert!(!names.is_empty(), "no KERNEL(name) lines in {SOURCE}");
    std::fs::write(path, names).expect("OUT_DIR is writable");
}
