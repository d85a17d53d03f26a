//! The test binaries of this package start without `LD_LIBRARY_PATH` and load
//! libtorch's CUDA part (build.rs: RUNPATH plus `--no-as-needed -ltorch`).

use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};

/// Set in the child process so that it does not spawn again.
const CHILD: &str = "AMP_TCH_LINK_CHILD";

/// The tiny tch test the child runs: a libtorch op, and libtorch_cuda.so
/// mapped into the process (when this libtorch has one), which is what makes
/// `tch::Cuda::is_available()` able to see a GPU.
#[test]
fn tiny_tch_op() {
    let sum = Tensor::from_slice(&[1.0f64, 2.0, 3.5]).sum(Kind::Double);
    assert_eq!(sum.double_value(&[]), 6.5);
    let _ = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let lib = Path::new(env!("AMP_TCH_LIBTORCH_LIB"));
    if lib.join("libtorch_cuda.so").exists() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            maps.contains("libtorch_cuda.so"),
            "libtorch_cuda.so is not loaded: CUDA would be invisible"
        );
    }
}

#[test]
fn starts_without_ld_library_path() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(&exe)
        .args(["--exact", "tiny_tch_op", "--test-threads=1"])
        .env_remove("LD_LIBRARY_PATH")
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed without LD_LIBRARY_PATH ({}):\n{stdout}\n{stderr}",
        exe.display(),
        output.status
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
}

#[test]
fn runpath_names_the_libtorch_directory() {
    let exe = std::env::current_exe().unwrap();
    let Ok(output) = Command::new("readelf").arg("-d").arg(&exe).output() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "NOTICE: readelf not found, RUNPATH check SKIPPED"
        );
        return;
    };
    let dynamic = String::from_utf8_lossy(&output.stdout);
    let lib = env!("AMP_TCH_LIBTORCH_LIB");
    assert!(
        dynamic
            .lines()
            .any(|l| (l.contains("(RUNPATH)") || l.contains("(RPATH)")) && l.contains(lib)),
        "no RUNPATH to {lib}:\n{dynamic}"
    );
    assert!(
        dynamic
            .lines()
            .any(|l| l.contains("(NEEDED)") && l.contains("[libtorch.so]")),
        "libtorch.so is not a needed library:\n{dynamic}"
    );
}
