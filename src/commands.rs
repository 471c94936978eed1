//! The command-line commands, on typed arguments; `main.rs` only parses flags.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::bundle::{self, Bundle, BundleKind};
use crate::config::Config;
use crate::engine::OnnxModel;
use crate::generate::{run_job, JobSpec, Outcome};
use crate::pipeline::{LoadOptions, Pipeline};
use crate::request::Request;

/// Loads the model a request names (or the configured default).
pub fn open_model(config: &Config, name: Option<&str>) -> Result<Bundle> {
    let name = match name.filter(|n| !n.is_empty()) {
        Some(name) => name,
        None if !config.models.default.is_empty() => config.models.default.as_str(),
        None => bail!("no model given and models.default is not set in the configuration"),
    };
    bundle::resolve(&config.models.dir, name)
}

pub fn load_pipeline(config: &Config, bundle: &Bundle) -> Result<Pipeline> {
    crate::engine::set_threads(config.engine.threads);
    Pipeline::load(
        bundle,
        LoadOptions {
            memory: config.engine.memory,
            cache_dir: config.compile_cache_dir(),
            cache_max_bytes: config.compile_cache_max_bytes(),
            attention_slice_bytes: config.attention_slice_bytes(),
            matrix_path: config.matrix_path(),
        },
    )
    .with_context(|| format!("loading model '{}'", bundle.id))
}

/// `edgegen generate`: one request to PNG files, with a progress bar on a terminal.
pub fn generate(config: &Config, request: &Request, output: Option<&Path>) -> Result<Outcome> {
    let bundle = open_model(config, request.model.as_deref())?;
    let pipeline = load_pipeline(config, &bundle)?;
    let settings = pipeline.resolve(request, &config.limits)?;
    let id = request
        .id
        .clone()
        .unwrap_or_else(|| format!("cli-{}", settings.seed));
    let png_path = match output {
        Some(path) => path.to_path_buf(),
        None => crate::storage::dated_png_path(&config.storage.output_dir, &id),
    };
    let bar = ProgressBar::new(u64::from(settings.steps));
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(bundle.id.clone());
    let mut hook = |step: usize, _steps: usize| {
        bar.set_position(step as u64);
        true
    };
    let spec = JobSpec {
        id: &id,
        model: &bundle.id,
        request,
        settings: &settings,
        png_path: &png_path,
    };
    let outcome = run_job(&pipeline, &spec, &mut hook);
    bar.finish_and_clear();
    outcome
}

/// `edgegen models list`: one line per bundle, broken ones with the reason.
pub fn models_list(config: &Config) -> Result<String> {
    let mut out = String::new();
    for entry in bundle::list(&config.models.dir)? {
        match &entry.bundle {
            Ok(b) => {
                let classes = b
                    .manifest
                    .gan
                    .as_ref()
                    .filter(|g| !g.classes.is_empty())
                    .map(|g| format!("  classes: {}", g.classes.join(", ")))
                    .unwrap_or_default();
                let default = if entry.id == config.models.default {
                    " (default)"
                } else {
                    ""
                };
                writeln!(
                    out,
                    "{}{default}\t{}\t{}\t{}{classes}",
                    entry.id,
                    b.kind(),
                    human_bytes(b.size_on_disk()),
                    b.display_name()
                )?;
            }
            Err(reason) => writeln!(out, "{}\tbroken\t{reason}", entry.id)?,
        }
    }
    Ok(out)
}

/// `edgegen models inspect`: components, their inputs and weight formats, defaults.
pub fn models_inspect(config: &Config, name: &str) -> Result<String> {
    let bundle = open_model(config, Some(name))?;
    let mut out = String::new();
    writeln!(out, "id: {}", bundle.id)?;
    writeln!(out, "name: {}", bundle.display_name())?;
    writeln!(out, "kind: {}", bundle.kind())?;
    writeln!(out, "directory: {}", bundle.dir.display())?;
    writeln!(out, "size on disk: {}", human_bytes(bundle.size_on_disk()))?;
    if let Some(license) = &bundle.manifest.license {
        writeln!(out, "license: {license}")?;
    }
    for component in components(&bundle) {
        let path = bundle.path(&component);
        let model = OnnxModel::load(&path)?;
        let summary = model.summary();
        writeln!(
            out,
            "{component}: {} nodes, weights {}",
            summary.node_count,
            summary.quantization()
        )?;
        for input in model.inputs() {
            writeln!(out, "  input  {input}")?;
        }
        writeln!(out, "  output {}", model.outputs().join(", "))?;
    }
    let pipeline = load_pipeline(config, &bundle)?;
    match &pipeline {
        Pipeline::Diffusion(p) => {
            let (w, h) = p.default_size();
            writeln!(
                out,
                "defaults: steps {}, size {w}x{h}, scheduler {}",
                p.default_steps(),
                p.default_scheduler().name()
            )?;
        }
        Pipeline::Gan(p) => {
            let (w, h) = p.size();
            writeln!(out, "output size: {w}x{h}")?;
            if !p.classes().is_empty() {
                writeln!(out, "classes: {}", p.classes().join(", "))?;
            }
        }
    }
    Ok(out)
}

fn components(bundle: &Bundle) -> Vec<String> {
    let names: &[&str] = match bundle.kind() {
        BundleKind::Diffusion => &["text_encoder", "unet", "vae_decoder"],
        BundleKind::Gan => &["text_encoder", "generator"],
    };
    names
        .iter()
        .map(|n| format!("{n}/model.onnx"))
        .filter(|p| bundle.path(p).is_file())
        .collect()
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The config file given on the command line, or the default one.
pub fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    Config::load(path.map(PathBuf::as_path)).map_err(|e| anyhow!("{e:#}"))
}
