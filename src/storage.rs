//! Output files: atomic writes, the `<output_dir>/<date>/<id>.{png,json}`
//! layout, and retention.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` so that readers see the old file or the whole new
/// one, never a part: temporary file in the same directory, fsync, rename,
/// fsync of the directory. The temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// True when an I/O error means the disk (or quota) is full.
pub fn is_storage_full(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ) || e.raw_os_error() == Some(28)
        })
    })
}

/// Where a finished picture and its sidecar were written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFiles {
    pub png: PathBuf,
    pub json: PathBuf,
}

/// Writes the PNG, then the JSON sidecar; the sidecar's presence marks a complete result.
pub fn store_pair(png_path: &Path, png: &[u8], sidecar: &serde_json::Value) -> Result<StoredFiles> {
    if let Some(dir) = png_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json_path = png_path.with_extension("json");
    write_atomic(png_path, png).with_context(|| format!("writing {}", png_path.display()))?;
    let mut text = serde_json::to_vec_pretty(sidecar).context("encoding sidecar JSON")?;
    text.push(b'\n');
    if let Err(err) = write_atomic(&json_path, &text) {
        let _ = fs::remove_file(png_path);
        return Err(err).with_context(|| format!("writing {}", json_path.display()));
    }
    Ok(StoredFiles {
        png: png_path.to_path_buf(),
        json: json_path,
    })
}

/// The `<output_dir>/<YYYY-MM-DD>/<id>.png` path of a job finished today (local time).
pub fn dated_png_path(output_dir: &Path, id: &str) -> PathBuf {
    let date = chrono::Local::now().format("%Y-%m-%d").to_string();
    output_dir.join(date).join(format!("{id}.png"))
}

/// True for a `YYYY-MM-DD` folder name (digits and dashes only, so it can
/// never step outside the output directory).
pub fn is_date_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// The `<output_dir>/<YYYY-MM-DD>` folders, oldest first; none when the
/// output directory does not exist yet.
pub fn date_dirs(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", output_dir.display())),
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.file_name().to_str().is_some_and(is_date_name))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("a.png");
        assert!(write_atomic(&path, b"x").is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn pair_writes_png_and_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("2026-01-01").join("job1.png");
        let stored = store_pair(&png, b"png", &serde_json::json!({"id": "job1"})).unwrap();
        assert_eq!(stored.json, dir.path().join("2026-01-01").join("job1.json"));
        let sidecar: serde_json::Value =
            serde_json::from_slice(&fs::read(&stored.json).unwrap()).unwrap();
        assert_eq!(sidecar["id"], "job1");
    }
}
