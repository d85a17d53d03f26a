//! Files: atomic writes, and reads that accept only regular files.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use amp_core::{AmpError, Result};

/// Reads the whole file at `path`, refusing anything that is not a regular
/// file before opening it: opening a FIFO for reading would block until a
/// writer appears, and a device may never end.
pub(crate) fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let error = |what: &str, e: std::io::Error| {
        AmpError::Checkpoint(format!("cannot {what} {}: {e}", path.display()))
    };
    let metadata = fs::metadata(path).map_err(|e| error("read", e))?;
    if !metadata.is_file() {
        return Err(AmpError::Checkpoint(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut file = File::open(path).map_err(|e| error("open", e))?;
    // Checked again on the open file, in case the path was replaced between
    // the two calls.
    let opened = file.metadata().map_err(|e| error("inspect", e))?;
    if !opened.is_file() {
        return Err(AmpError::Checkpoint(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(opened.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(|e| error("read", e))?;
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it
/// over `path` and syncs the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_error =
        |what: &str, e: std::io::Error| AmpError::Checkpoint(format!("cannot {what}: {e}"));
    let name = path
        .file_name()
        .ok_or_else(|| AmpError::Checkpoint(format!("{} does not name a file", path.display())))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);

    let written = (|| {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error(&format!("create {}", tmp.display()), e))?;
        file.write_all(bytes)
            .map_err(|e| io_error(&format!("write {}", tmp.display()), e))?;
        // The data must be on disk before the rename makes it the checkpoint.
        file.sync_all()
            .map_err(|e| io_error(&format!("sync {}", tmp.display()), e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| {
            io_error(
                &format!("rename {} to {}", tmp.display(), path.display()),
                e,
            )
        })
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    // Make the rename itself durable. Not every platform can open a
    // directory for syncing; the checkpoint is complete either way.
    if let Ok(dir) = File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
