//! Room for a plan: the cache's own bound (`engine.cache_max_mb`) and the
//! free space it leaves on its file system. Pictures and the spool usually
//! share that disk, and a saved plan only makes a start faster, so the cache
//! never takes the last of it.

use std::path::Path;

use super::{remove_files, saved_plans};

/// Free space the compile cache leaves on its file system: a tenth of the
/// file system, at most 1 GiB.
pub fn reserve(fs_bytes: u64) -> u64 {
    (fs_bytes / 10).min(1 << 30)
}

/// Space on the file system that holds `dir`, or will once it is created:
/// (available to this user, size).
fn space(dir: &Path) -> Option<(u64, u64)> {
    let existing = dir.ancestors().find(|d| d.exists())?;
    let stat = rustix::fs::statvfs(existing).ok()?;
    Some((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}

/// Why a plan is not saved.
#[derive(Debug, thiserror::Error)]
#[error(
    "the file system of {dir} has {} free, and the compile cache keeps {} of it free: \
     no room for {} more",
    mib(*.available), mib(*.reserve), mib(*.incoming)
)]
pub struct NoRoom {
    incoming: u64,
    available: u64,
    reserve: u64,
    dir: String,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Deletes the least recently used plans (of any model, never `keep`) until
/// `incoming` more bytes fit both the cache's bound and the disk's reserve.
/// The bound may still be exceeded by `keep` alone; the reserve is an error.
pub fn make_room(
    dir: &Path,
    max_bytes: Option<u64>,
    keep: &Path,
    incoming: u64,
) -> Result<(), NoRoom> {
    let mut plans = saved_plans(dir);
    let mut total: u64 = plans.iter().map(|p| p.bytes).sum();
    plans.sort_by_key(|p| p.used);
    let mut candidates = plans.into_iter().filter(|p| p.stem != keep);
    loop {
        let over_bound = max_bytes.is_some_and(|max| total + incoming > max);
        // Unknown space (no statvfs) leaves only the bound to keep.
        let (available, size) = space(dir).unwrap_or((u64::MAX, 0));
        let short = (reserve(size) + incoming).saturating_sub(available);
        if !over_bound && short == 0 {
            return Ok(());
        }
        let Some(plan) = candidates.next() else {
            if short == 0 {
                return Ok(());
            }
            return Err(NoRoom {
                incoming,
                available,
                reserve: reserve(size),
                dir: dir.display().to_string(),
            });
        };
        let why = if over_bound {
            format!("over {}", mib(max_bytes.unwrap_or(0)))
        } else {
            format!("{} short of the disk space it keeps free", mib(short))
        };
        log::info!(
            "compile cache: {why}, deleting the plan least recently used ({}, {})",
            plan.stem.display(),
            mib(plan.bytes)
        );
        remove_files(&plan.files);
        total -= plan.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_tenth_of_the_disk_up_to_one_gib() {
        assert_eq!(reserve(0), 0);
        assert_eq!(reserve(64 << 20), (64 << 20) / 10);
        assert_eq!(reserve(8 << 30), (8 << 30) / 10);
        assert_eq!(reserve(16 << 30), 1 << 30);
        assert_eq!(reserve(2 << 40), 1 << 30);
    }

    #[test]
    fn no_room_says_what_is_free_and_what_is_kept() {
        let err = NoRoom {
            incoming: 3 << 19,
            available: 5 << 20,
            reserve: 6 << 20,
            dir: "/var/lib/edgegen/cache".into(),
        };
        assert_eq!(
            err.to_string(),
            "the file system of /var/lib/edgegen/cache has 5.0 MiB free, and the compile cache \
             keeps 6.0 MiB of it free: no room for 1.5 MiB more"
        );
    }

    #[test]
    fn the_space_of_an_existing_directory_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let (available, size) = space(dir.path()).expect("statvfs");
        assert!(size > 0 && available <= size);
        let (_, absent_size) = space(&dir.path().join("absent/below")).expect("an ancestor's");
        assert_eq!(absent_size, size);
    }
}
