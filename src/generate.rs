//! One generation job from resolved settings to files on disk: the code path
//! shared by `edgegen generate` and the daemon.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::pipeline::{Pipeline, StepHook, Timings};
use crate::request::{Request, Settings};
use crate::storage::{self, StoredFiles};

/// One stored picture of a job.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StoredImage {
    pub path: PathBuf,
    pub sidecar: PathBuf,
    pub sha256: String,
    pub seed: u64,
}

/// What a finished job left behind.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub id: String,
    pub model: String,
    pub settings: Settings,
    pub images: Vec<StoredImage>,
    pub timings: Timings,
}

/// Everything a job needs besides the loaded pipeline.
pub struct JobSpec<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub request: &'a Request,
    pub settings: &'a Settings,
    /// Where the first picture goes; others of a batch get `-2`, `-3`… suffixes.
    pub png_path: &'a Path,
}

/// Paths of every picture of a batch: `x.png`, `x-2.png`, `x-3.png`, ….
pub fn batch_paths(first: &Path, batch: u32) -> Vec<PathBuf> {
    let stem = first
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("image");
    (1..=batch)
        .map(|i| match i {
            1 => first.to_path_buf(),
            i => first.with_file_name(format!("{stem}-{i}.png")),
        })
        .collect()
}

/// Generates and stores the pictures of one job, each with its JSON sidecar.
pub fn run_job(pipeline: &Pipeline, spec: &JobSpec, hook: StepHook) -> Result<Outcome> {
    let generated = pipeline.generate(spec.settings, hook)?;
    let parameters = spec.settings.a1111_parameters(spec.model);
    let paths = batch_paths(spec.png_path, spec.settings.batch);
    let mut images = Vec::new();
    for (index, (picture, path)) in generated.pictures.iter().zip(&paths).enumerate() {
        let png = picture.to_png(Some(&parameters))?;
        let sha256 = hex_sha256(&png);
        let sidecar = serde_json::json!({
            "id": spec.id,
            "index": index,
            "model": spec.model,
            "request": spec.request,
            "settings": spec.settings,
            "timings": generated.timings,
            "sha256": sha256,
            "file": path.file_name().and_then(|n| n.to_str()),
            "created": chrono::Local::now().to_rfc3339(),
        });
        let StoredFiles { png: path, json } = storage::store_pair(path, &png, &sidecar)
            .with_context(|| format!("storing picture {} of job {}", index + 1, spec.id))?;
        images.push(StoredImage {
            path,
            sidecar: json,
            sha256,
            seed: spec.settings.seed,
        });
    }
    Ok(Outcome {
        id: spec.id.to_string(),
        model: spec.model.to_string(),
        settings: spec.settings.clone(),
        images,
        timings: generated.timings,
    })
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
