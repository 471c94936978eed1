//! What the file system says about a file (size, modification time), to
//! notice that it changed without reading it: the compile cache trusts a
//! model's remembered hash, and the daemon a model's remembered load error,
//! while the stamps of its files stay the same.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: PathBuf,
    pub bytes: u64,
    /// Nanoseconds since the epoch; 0 where the file system keeps no time.
    pub modified_ns: u128,
}

impl FileStamp {
    pub fn of(path: &Path) -> io::Result<FileStamp> {
        let meta = fs::metadata(path)?;
        Ok(FileStamp::from_metadata(path.to_path_buf(), &meta))
    }

    /// Every file under `dir`, sorted by path; entries that cannot be read are left out.
    pub fn all_under(dir: &Path) -> Vec<FileStamp> {
        let mut files = Vec::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(entry.path());
                } else {
                    files.push(FileStamp::from_metadata(entry.path(), &meta));
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files
    }

    fn from_metadata(path: PathBuf, meta: &fs::Metadata) -> FileStamp {
        let modified_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        FileStamp {
            path,
            bytes: meta.len(),
            modified_ns,
        }
    }

    /// Whether the file still has this size and time.
    pub fn unchanged(&self) -> bool {
        FileStamp::of(&self.path).is_ok_and(|now| now == *self)
    }
}
