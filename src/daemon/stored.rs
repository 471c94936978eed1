//! Results as messages: from a job that just finished, or from the files a
//! job with the same id stored earlier (idempotent requests are answered from
//! storage, not generated twice).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::generate::Outcome;
use crate::mqtt::messages::{ImageInfo, JobResult, JobState, ResultTimings};

/// The success result of a finished job.
pub fn from_outcome(outcome: &Outcome, queue_ms: f64, store_ms: f64) -> JobResult {
    let mut timings = ResultTimings::from(&outcome.timings);
    timings.queue_ms = Some(queue_ms);
    timings.store_ms = Some(store_ms);
    let first = outcome.images.first();
    JobResult {
        id: outcome.id.clone(),
        state: Some(JobState::Done),
        model: Some(outcome.model.clone()),
        seed: Some(outcome.settings.seed),
        path: first.map(|i| i.path.display().to_string()),
        sidecar: first.map(|i| i.sidecar.display().to_string()),
        sha256: first.map(|i| i.sha256.clone()),
        width: Some(outcome.settings.width),
        height: Some(outcome.settings.height),
        steps: outcome.settings.scheduler.map(|_| outcome.settings.steps),
        scheduler: outcome.settings.scheduler.map(|s| s.name().to_string()),
        images: outcome
            .images
            .iter()
            .map(|i| ImageInfo {
                path: i.path.display().to_string(),
                sha256: i.sha256.clone(),
                seed: i.seed,
            })
            .collect(),
        timings: Some(timings),
        from_storage: false,
        error: None,
    }
}

/// The stored result of `id`, newest date folder first, or `None`.
pub fn find(output_dir: &Path, id: &str) -> Result<Option<JobResult>> {
    for dir in date_dirs_newest_first(output_dir)? {
        let sidecar = dir.join(format!("{id}.json"));
        if sidecar.is_file() {
            return from_sidecars(&sidecar, id).map(Some);
        }
    }
    Ok(None)
}

fn date_dirs_newest_first(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", output_dir.display())),
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.reverse();
    Ok(dirs)
}

/// Builds the result from `<id>.json` and, for batches, `<id>-2.json`, ….
fn from_sidecars(first: &Path, id: &str) -> Result<JobResult> {
    let sidecar = read_json(first)?;
    let settings = &sidecar["settings"];
    let mut images = Vec::new();
    let mut path = first.to_path_buf();
    let mut index = 1;
    loop {
        let json = if index == 1 {
            sidecar.clone()
        } else {
            read_json(&path)?
        };
        let png = path.with_extension("png");
        images.push(ImageInfo {
            path: png.display().to_string(),
            sha256: json["sha256"].as_str().unwrap_or_default().to_string(),
            seed: json["settings"]["seed"].as_u64().unwrap_or_default(),
        });
        index += 1;
        path = first.with_file_name(format!("{id}-{index}.json"));
        if !path.is_file() {
            break;
        }
    }
    let timings: Option<ResultTimings> = serde_json::from_value(sidecar["timings"].clone()).ok();
    let u32_of = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let scheduler = settings["scheduler"].as_str().map(str::to_string);
    Ok(JobResult {
        id: id.to_string(),
        state: Some(JobState::Done),
        model: sidecar["model"].as_str().map(str::to_string),
        seed: settings["seed"].as_u64(),
        path: images.first().map(|i| i.path.clone()),
        sidecar: Some(first.display().to_string()),
        sha256: images.first().map(|i| i.sha256.clone()),
        width: u32_of(&settings["width"]),
        height: u32_of(&settings["height"]),
        steps: scheduler.as_ref().and(u32_of(&settings["steps"])),
        scheduler,
        images,
        timings,
        from_storage: true,
        error: None,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_newest_stored_result_with_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, value: Value| {
            let path = dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, serde_json::to_vec(&value).unwrap()).unwrap();
        };
        let settings = serde_json::json!({"seed": 7, "width": 64, "height": 48, "steps": 4, "scheduler": "euler"});
        write(
            "2026-01-01/j1.json",
            serde_json::json!({"model": "old", "settings": settings, "sha256": "aa"}),
        );
        write(
            "2026-01-02/j1.json",
            serde_json::json!({"model": "m", "settings": settings, "sha256": "bb", "timings": {"total_ms": 5.0}}),
        );
        write(
            "2026-01-02/j1-2.json",
            serde_json::json!({"settings": {"seed": 8}, "sha256": "cc"}),
        );
        let found = find(dir.path(), "j1").unwrap().unwrap();
        assert_eq!(found.model.as_deref(), Some("m"));
        assert_eq!(found.sha256.as_deref(), Some("bb"));
        assert_eq!(
            (found.width, found.height, found.steps),
            (Some(64), Some(48), Some(4))
        );
        assert_eq!(found.images.len(), 2);
        assert_eq!(found.images[1].seed, 8);
        assert!(found.from_storage);
        assert_eq!(found.timings.unwrap().total_ms, 5.0);
        assert!(find(dir.path(), "j2").unwrap().is_none());
    }
}
