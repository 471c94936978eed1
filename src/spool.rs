//! Durable queue of accepted, unfinished jobs: one JSON file per job in
//! `state_dir/spool/`, written atomically (temporary file, fsync, rename,
//! directory fsync) before the request is acknowledged to the broker, and
//! removed once its result is out. File names start with a zero-padded
//! sequence number, so a directory listing sorted by name is arrival order.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::storage::write_atomic;

/// The spool directory and the next sequence number.
pub struct Spool {
    dir: PathBuf,
    next_seq: u64,
}

/// A job read back from the spool.
#[derive(Debug)]
pub struct Spooled<T> {
    pub seq: u64,
    pub path: PathBuf,
    pub job: T,
}

impl Spool {
    /// Opens (creating) `dir`, removes temporary files a crash left behind, and
    /// returns the spooled jobs in arrival order. Files that do not parse are
    /// renamed to `*.bad` with a warning, so one corrupt file cannot stop the daemon.
    pub fn open<T: DeserializeOwned>(dir: &Path) -> Result<(Spool, Vec<Spooled<T>>)> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating spool directory {}", dir.display()))?;
        let mut jobs = Vec::new();
        let mut max_seq = 0;
        let entries = fs::read_dir(dir)
            .with_context(|| format!("reading spool directory {}", dir.display()))?;
        for entry in entries {
            let entry =
                entry.with_context(|| format!("reading spool directory {}", dir.display()))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') && name.ends_with(".tmp") {
                log::info!("removing unfinished spool write {}", path.display());
                remove_if_exists(&path).with_context(|| format!("removing {}", path.display()))?;
                continue;
            }
            let Some(seq) = sequence_of(name) else {
                continue;
            };
            max_seq = max_seq.max(seq);
            match read_job(&path) {
                Ok(job) => jobs.push(Spooled { seq, path, job }),
                Err(err) => {
                    log::warn!(
                        "spool file {} is unreadable ({err:#}); moving it aside",
                        path.display()
                    );
                    let aside = path.with_extension("bad");
                    fs::rename(&path, &aside)
                        .with_context(|| format!("renaming {}", path.display()))?;
                }
            }
        }
        jobs.sort_by_key(|j| j.seq);
        Ok((
            Spool {
                dir: dir.to_path_buf(),
                next_seq: max_seq + 1,
            },
            jobs,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a job durably and returns its file. `key` (a validated job id)
    /// only makes the file name readable; the sequence number makes it unique.
    pub fn add<T: Serialize>(&mut self, key: &str, job: &T) -> Result<PathBuf> {
        let seq = self.next_seq;
        let path = self.dir.join(format!("{seq:016}-{key}.json"));
        let bytes = serde_json::to_vec_pretty(job).context("encoding spool entry")?;
        write_atomic(&path, &bytes)
            .with_context(|| format!("writing spool file {}", path.display()))?;
        self.next_seq += 1;
        Ok(path)
    }

    /// Removes a finished job; a file that is already gone is fine.
    pub fn remove(&self, path: &Path) -> Result<()> {
        remove_if_exists(path)
            .with_context(|| format!("removing spool file {}", path.display()))?;
        // The directory entry must be durable too, or a crash could resurrect the job.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing spool directory {}", self.dir.display()))
    }
}

fn sequence_of(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".json")?;
    let (seq, _) = stem.split_once('-')?;
    seq.parse().ok()
}

fn read_job<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
    struct Job {
        id: String,
    }

    fn job(id: &str) -> Job {
        Job { id: id.into() }
    }

    #[test]
    fn jobs_come_back_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, found) = Spool::open::<Job>(dir.path()).unwrap();
        assert!(found.is_empty());
        // Ids sort the other way round to show that order comes from the sequence.
        let paths: Vec<_> = ["zz", "mm", "aa"]
            .iter()
            .map(|id| spool.add(id, &job(id)).unwrap())
            .collect();
        spool.remove(&paths[1]).unwrap();
        let (mut reopened, found) = Spool::open::<Job>(dir.path()).unwrap();
        let ids: Vec<_> = found.iter().map(|s| s.job.id.as_str()).collect();
        assert_eq!(ids, ["zz", "aa"]);
        // New jobs go after every existing one.
        let next = reopened.add("bb", &job("bb")).unwrap();
        assert!(next > found[1].path, "{next:?}");
    }

    #[test]
    fn temporaries_are_removed_and_corrupt_files_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".0000000000000001-a.json.1-0.tmp"), b"{").unwrap();
        fs::write(dir.path().join("0000000000000002-b.json"), b"not json").unwrap();
        let (mut spool, found) = Spool::open::<Job>(dir.path()).unwrap();
        assert!(found.is_empty());
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["0000000000000002-b.bad"]);
        // The sequence continues past the corrupt file's number.
        let path = spool.add("c", &job("c")).unwrap();
        assert!(path.ends_with("0000000000000003-c.json"), "{path:?}");
    }

    #[test]
    fn removing_twice_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open::<Job>(dir.path()).unwrap();
        let path = spool.add("a", &job("a")).unwrap();
        spool.remove(&path).unwrap();
        spool.remove(&path).unwrap();
    }
}
