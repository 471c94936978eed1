//! Retention of stored pictures (`storage.max_bytes`, `storage.max_age_days`,
//! oldest first) and removal of temporary files an interrupted write left.
//! Only `<output_dir>/<YYYY-MM-DD>/` folders are touched.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::storage::date_dirs;

/// Limits from `[storage]`; zero means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub max_bytes: u64,
    pub max_age_days: u32,
}

impl Policy {
    pub fn from_config(storage: &crate::config::StorageConfig) -> Self {
        Policy {
            max_bytes: storage.max_bytes,
            max_age_days: storage.max_age_days,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.max_bytes == 0 && self.max_age_days == 0
    }
}

/// What one pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub pictures: usize,
    pub bytes: u64,
}

/// A stored result: `<stem>.png` and `<stem>.json` in one date folder.
#[derive(Debug)]
struct Entry {
    files: Vec<PathBuf>,
    bytes: u64,
    newest: SystemTime,
}

/// Deletes the oldest results until both limits hold. Results whose files are
/// in `keep` (the one just written) are never deleted.
pub fn enforce(
    output_dir: &Path,
    policy: Policy,
    keep: &[PathBuf],
    now: SystemTime,
) -> Result<Removed> {
    if policy.is_unlimited() {
        return Ok(Removed::default());
    }
    let mut entries = collect(output_dir)?;
    entries.sort_by_key(|e| e.newest);
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let cutoff = (policy.max_age_days > 0)
        .then(|| now.checked_sub(Duration::from_secs(u64::from(policy.max_age_days) * 86_400)))
        .flatten();
    let mut removed = Removed::default();
    for entry in &entries {
        let too_old = cutoff.is_some_and(|c| entry.newest < c);
        let too_big = policy.max_bytes > 0 && total > policy.max_bytes;
        if !too_old && !too_big {
            // Sorted oldest first: nothing later is older, and the size limit holds.
            break;
        }
        if entry.files.iter().any(|f| keep.contains(f)) {
            continue;
        }
        remove_entry(entry)?;
        total -= entry.bytes;
        removed.pictures += 1;
        removed.bytes += entry.bytes;
    }
    remove_empty_date_dirs(output_dir)?;
    if removed.pictures > 0 {
        log::info!(
            "retention: removed {} stored pictures ({} bytes) from {}",
            removed.pictures,
            removed.bytes,
            output_dir.display()
        );
    }
    Ok(removed)
}

fn collect(output_dir: &Path) -> Result<Vec<Entry>> {
    let mut entries: BTreeMap<PathBuf, Entry> = BTreeMap::new();
    for dir in date_dirs(output_dir)? {
        for file in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let file = file.with_context(|| format!("reading {}", dir.display()))?;
            let path = file.path();
            let is_result = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("png" | "json")
            );
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !is_result || hidden {
                continue;
            }
            let Ok(meta) = file.metadata() else {
                continue; // removed meanwhile
            };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let entry = entries.entry(path.with_extension("")).or_insert(Entry {
                files: Vec::new(),
                bytes: 0,
                newest: SystemTime::UNIX_EPOCH,
            });
            entry.files.push(path);
            entry.bytes += meta.len();
            entry.newest = entry.newest.max(modified);
        }
    }
    Ok(entries.into_values().collect())
}

fn remove_entry(entry: &Entry) -> Result<()> {
    // The sidecar goes first: its presence is what marks a stored result.
    let mut files = entry.files.clone();
    files.sort_by_key(|f| f.extension().and_then(|e| e.to_str()) != Some("json"));
    for file in files {
        match fs::remove_file(&file) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                return Err(err).with_context(|| format!("removing {}", file.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn remove_empty_date_dirs(output_dir: &Path) -> Result<()> {
    for dir in date_dirs(output_dir)? {
        let empty = fs::read_dir(&dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if empty {
            // Another writer may have just created a file in it: then this fails, which is fine.
            let _ = fs::remove_dir(&dir);
        }
    }
    Ok(())
}

/// Removes `.<name>.<pid>-<n>.tmp` files (left by `storage::write_atomic` when a
/// process died mid-write) from the date folders, unless their process still runs.
pub fn sweep_temporaries(output_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for dir in date_dirs(output_dir)? {
        for file in fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
        {
            let name = file.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with('.') && name.ends_with(".tmp")) || writer_is_alive(name) {
                continue;
            }
            let path = file.path();
            match fs::remove_file(&path) {
                Ok(()) => {
                    log::info!("removed unfinished write {}", path.display());
                    removed += 1;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("removing {}", path.display()))
                }
            }
        }
    }
    Ok(removed)
}

/// True when the pid in a temporary file's name is another running process.
fn writer_is_alive(temp_name: &str) -> bool {
    let pid = temp_name
        .strip_suffix(".tmp")
        .and_then(|s| s.rsplit_once('.'))
        .and_then(|(_, tail)| tail.split_once('-'))
        .and_then(|(pid, _)| pid.parse::<u32>().ok());
    match pid {
        Some(pid) if pid != std::process::id() => Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: usize, age_days: u64) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, vec![0u8; bytes]).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_days * 86_400);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn size_limit_removes_oldest_pairs_first() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for (stem, age) in [("old", 3), ("mid", 2), ("new", 1)] {
            write(
                &out.join("2026-01-01").join(format!("{stem}.png")),
                100,
                age,
            );
            write(
                &out.join("2026-01-01").join(format!("{stem}.json")),
                10,
                age,
            );
        }
        let policy = Policy {
            max_bytes: 230,
            max_age_days: 0,
        };
        let removed = enforce(out, policy, &[], SystemTime::now()).unwrap();
        assert_eq!(
            removed,
            Removed {
                pictures: 1,
                bytes: 110
            }
        );
        assert!(!out.join("2026-01-01/old.png").exists());
        assert!(!out.join("2026-01-01/old.json").exists());
        assert!(out.join("2026-01-01/mid.png").exists());
    }

    #[test]
    fn age_limit_and_kept_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        write(&out.join("2026-01-01/a.png"), 5, 10);
        write(&out.join("2026-01-02/b.png"), 5, 10);
        write(&out.join("2026-01-03/c.png"), 5, 0);
        write(&out.join("notes/keep.png"), 5, 100);
        let keep = vec![out.join("2026-01-02/b.png")];
        let removed = enforce(
            out,
            Policy {
                max_bytes: 0,
                max_age_days: 7,
            },
            &keep,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(removed.pictures, 1);
        assert!(
            !out.join("2026-01-01").exists(),
            "empty date folders go too"
        );
        assert!(out.join("2026-01-02/b.png").exists());
        assert!(out.join("2026-01-03/c.png").exists());
        assert!(
            out.join("notes/keep.png").exists(),
            "only date folders are managed"
        );
    }

    #[test]
    fn temporaries_of_dead_writers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let day = dir.path().join("2026-01-01");
        fs::create_dir_all(&day).unwrap();
        // pid 0 is never a user process; our own pid is "dead" from this sweep's view.
        fs::write(day.join(".a.png.0-1.tmp"), b"x").unwrap();
        fs::write(
            day.join(format!(".b.png.{}-2.tmp", std::process::id())),
            b"x",
        )
        .unwrap();
        fs::write(day.join("c.png"), b"x").unwrap();
        assert_eq!(sweep_temporaries(dir.path()).unwrap(), 2);
        assert!(day.join("c.png").exists());
    }
}
