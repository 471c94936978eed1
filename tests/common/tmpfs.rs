//! Small file systems for disk-full tests: tmpfs mounts, which need root (CI
//! runs as root). Run as another user, `Tmpfs::mount` prints why and the test
//! does nothing.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the test, unmounted (lazily, so a straggling process
/// cannot block it) when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// `None` (with the reason printed) when this user may not mount.
    pub fn mount(path: &Path, options: &str) -> Option<Tmpfs> {
        fs::create_dir_all(path).expect("mount point");
        let is_root = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|v| v.split_whitespace().next() == Some("0"))
            })
            .unwrap_or(false);
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs {
                path: path.to_path_buf(),
            }),
            // Root must be able to mount: a failure there is a real failure.
            _ if is_root => panic!("mount -t tmpfs -o {options} failed as root"),
            _ => {
                eprintln!("skipped: mounting tmpfs needs root");
                None
            }
        }
    }

    /// Bytes free on it.
    pub fn available(&self) -> u64 {
        let stat = rustix::fs::statvfs(&self.path).expect("statvfs");
        stat.f_bavail * stat.f_frsize
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        let stat = rustix::fs::statvfs(&self.path).expect("statvfs");
        stat.f_blocks * stat.f_frsize
    }

    /// Writes a filler file that leaves about `free` bytes (rounded down to
    /// pages) free; returns the file.
    pub fn fill_leaving(&self, free: u64) -> PathBuf {
        let filler = self.path.join(format!("filler-{}", free));
        let take = self.available().saturating_sub(free);
        let mut file = fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        for _ in 0..take.div_ceil(4096) {
            file.write_all(&block).expect("filling");
        }
        file.sync_all().expect("filler");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills a file system completely; returns the filler file.
pub fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut file = fs::File::create(&filler).expect("filler");
    let block = vec![0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    filler
}
