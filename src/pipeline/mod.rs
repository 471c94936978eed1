//! Generation pipelines: one code path from resolved settings to pictures.

pub mod diffusion;
pub mod gan;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::bundle::{Bundle, BundleKind};
use crate::config::{Limits, MemoryMode};
use crate::engine::{MatrixPath, ModelOptions, OnnxModel};
use crate::picture::Picture;
use crate::request::{FieldError, Request, Settings};

pub use diffusion::DiffusionPipeline;
pub use gan::GanPipeline;

/// Returned (inside `anyhow::Error`) when a progress callback asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// Called before each denoising step with (step index, step count); returning
/// `false` cancels the job.
pub type StepHook<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

/// Time spent per component, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Timings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unet_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_decoder_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_ms: Option<f64>,
    pub total_ms: f64,
}

pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// What a pipeline produced for one request.
#[derive(Clone, Debug)]
pub struct Generated {
    pub pictures: Vec<Picture>,
    /// The decoder's raw output, NCHW, for exact comparisons in tests.
    pub raw: ndarray::ArrayD<f32>,
    pub timings: Timings,
}

/// A graph file of a bundle, kept in memory or loaded for each use.
pub struct Component {
    path: PathBuf,
    resident: Option<Arc<OnnxModel>>,
    engine: ModelOptions,
}

impl Component {
    pub fn open(path: PathBuf, options: &LoadOptions) -> Result<Self> {
        let engine = ModelOptions {
            cache_dir: options.cache_dir.clone(),
            cache_max_bytes: options.cache_max_bytes,
            attention_slice_bytes: options.attention_slice_bytes,
            matrix_path: options.matrix_path,
            ..ModelOptions::default()
        };
        let model = Arc::new(OnnxModel::open(&path, &engine)?);
        let resident = (options.memory == MemoryMode::Resident).then_some(model);
        Ok(Component {
            path,
            resident,
            engine,
        })
    }

    pub fn get(&self) -> Result<Arc<OnnxModel>> {
        match &self.resident {
            Some(model) => Ok(model.clone()),
            None => Ok(Arc::new(OnnxModel::open(&self.path, &self.engine)?)),
        }
    }
}

/// Options that apply to every pipeline of a process.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub memory: MemoryMode,
    /// Compile cache directory (see `engine::ModelOptions`).
    pub cache_dir: Option<PathBuf>,
    /// See `engine::ModelOptions::cache_max_bytes`.
    pub cache_max_bytes: Option<u64>,
    /// See `engine::ModelOptions::attention_slice_bytes`.
    pub attention_slice_bytes: Option<usize>,
    /// See `engine::ModelOptions::matrix_path`.
    pub matrix_path: MatrixPath,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            memory: MemoryMode::default(),
            cache_dir: None,
            cache_max_bytes: None,
            attention_slice_bytes: ModelOptions::default().attention_slice_bytes,
            matrix_path: MatrixPath::from_env_or_cpu(),
        }
    }
}

/// A loaded model of either kind.
// One value per loaded model, built once and kept: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Pipeline {
    Diffusion(DiffusionPipeline),
    Gan(GanPipeline),
}

impl Pipeline {
    pub fn load(bundle: &Bundle, options: LoadOptions) -> Result<Pipeline> {
        Ok(match bundle.kind() {
            BundleKind::Diffusion => Pipeline::Diffusion(DiffusionPipeline::load(bundle, options)?),
            BundleKind::Gan => Pipeline::Gan(GanPipeline::load(bundle, options)?),
        })
    }

    /// Applies the model's defaults and checks every field against the model and `limits`.
    pub fn resolve(&self, request: &Request, limits: &Limits) -> Result<Settings, FieldError> {
        match self {
            Pipeline::Diffusion(p) => p.resolve(request, limits),
            Pipeline::Gan(p) => p.resolve(request, limits),
        }
    }

    pub fn generate(&self, settings: &Settings, hook: StepHook) -> Result<Generated> {
        match self {
            Pipeline::Diffusion(p) => p.generate(settings, hook),
            Pipeline::Gan(p) => p.generate(settings, hook),
        }
    }
}

/// Checks shared by all kinds: prompt length and batch size.
pub(crate) fn check_common(request: &Request, limits: &Limits) -> Result<u32, FieldError> {
    for (field, text) in [
        ("prompt", &request.prompt),
        ("negative_prompt", &request.negative_prompt),
    ] {
        if let Some(text) = text {
            let chars = text.chars().count();
            if chars > limits.max_prompt_chars {
                return Err(FieldError::new(
                    field,
                    format!(
                        "{chars} characters, at most {} allowed",
                        limits.max_prompt_chars
                    ),
                ));
            }
        }
    }
    let batch = request.batch.unwrap_or(1);
    if !(1..=16).contains(&batch) {
        return Err(FieldError::new(
            "batch",
            format!("{batch} is not between 1 and 16"),
        ));
    }
    Ok(batch)
}
