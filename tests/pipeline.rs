//! End-to-end generation equals diffusers' PyTorch pipelines (and the PyTorch
//! GAN generators) on the committed fixtures: same weights, prompt, seed,
//! scheduler and size.
//!
//! Tolerance: 2/255 per channel after 8-bit conversion (the bar).
//! tract and PyTorch differ by float32 rounding in each graph (≈1e-6 per
//! component, up to ≈3e-5 on the latents after several steps — see
//! `onnx_replay_max_abs_diff` in references/pipelines.json), which can move
//! a pixel that sits on a rounding boundary by one level; two levels leave
//! room for that while any real mistake (wrong scheduler step, wrong
//! noise draw, wrong guidance) moves pixels by tens of levels.

mod common;

use std::path::{Path, PathBuf};

use common::{array, copy_dir, fixtures, max_u8_diff, read_json};
use edgegen::bundle::Bundle;
use edgegen::config::Limits;
use edgegen::pipeline::{LoadOptions, Pipeline};
use edgegen::request::Request;
use serde_json::Value;

const MAX_DIFF: u8 = 2;

fn case_names(index: &str) -> Vec<String> {
    let index = read_json(&fixtures().join("references").join(index));
    index["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["case"].as_str().expect("case name").to_string())
        .collect()
}

/// The case's bundle, copied with its scheduler config edited when the case
/// overrides keys beyond what the scheduler name itself implies.
fn bundle_for(case: &Value, scratch: &Path) -> PathBuf {
    let name = case["bundle"].as_str().expect("bundle");
    let original = fixtures().join("bundles").join(name);
    let mut overrides = case["scheduler_overrides"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    overrides.remove("use_karras_sigmas");
    let truncation = case
        .get("truncation_is_bundle_default")
        .and_then(Value::as_bool)
        == Some(false);
    if overrides.is_empty() && !truncation {
        return original;
    }
    let copy = scratch.join(name);
    copy_dir(&original, &copy);
    if !overrides.is_empty() {
        let path = copy.join("scheduler/scheduler_config.json");
        let mut config = read_json(&path);
        for (key, value) in overrides {
            config[key] = value;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    }
    if truncation {
        let path = copy.join("edgegen.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let psi = case["truncation"].as_f64().expect("truncation");
        let edited: Vec<String> = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("truncation") {
                    format!("truncation = {psi}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&path, edited.join("\n")).unwrap();
    }
    copy
}

fn request_for(case: &Value) -> Request {
    let text = |k: &str| case.get(k).and_then(Value::as_str).map(str::to_string);
    let number = |k: &str| case.get(k).and_then(Value::as_u64);
    let is_gan = case.get("pipeline").is_none();
    Request {
        prompt: text("prompt"),
        negative_prompt: text("negative_prompt"),
        seed: number("seed"),
        steps: if is_gan {
            None
        } else {
            number("steps").map(|s| s as u32)
        },
        guidance: if is_gan {
            None
        } else {
            case["guidance"].as_f64().map(|g| g as f32)
        },
        width: number("width").map(|w| w as u32),
        height: number("height").map(|h| h as u32),
        scheduler: text("scheduler"),
        class: text("class"),
        batch: number("batch").map(|b| b as u32),
        ..Request::default()
    }
}

fn run_case(name: &str, image_key: &str) -> u8 {
    let case = read_json(&fixtures().join("references").join(format!("{name}.json")));
    let scratch = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(&bundle_for(&case, scratch.path())).unwrap();
    let pipeline = Pipeline::load(&bundle, LoadOptions::default()).unwrap();
    let limits = Limits::default();
    let settings = pipeline.resolve(&request_for(&case), &limits).unwrap();
    let generated = pipeline.generate(&settings, &mut |_, _| true).unwrap();
    let (shape, reference) = array(&case["arrays"][image_key]);
    let rgb: Vec<u8> = generated
        .pictures
        .iter()
        .flat_map(|p| p.rgb.iter().copied())
        .collect();
    let (height, width) = (shape[shape.len() - 3], shape[shape.len() - 2]);
    for picture in &generated.pictures {
        assert_eq!(
            (picture.width as usize, picture.height as usize),
            (width, height),
            "{name}: size"
        );
    }
    max_u8_diff(&rgb, &reference)
}

#[test]
fn diffusion_cases_equal_diffusers() {
    let mut failures = Vec::new();
    for name in case_names("pipelines.json") {
        let diff = run_case(&name, "image");
        eprintln!("{name}: max difference {diff}/255");
        if diff > MAX_DIFF {
            failures.push(format!("{name}: {diff}/255"));
        }
    }
    assert!(failures.is_empty(), "beyond {MAX_DIFF}/255: {failures:?}");
}

#[test]
fn gan_cases_equal_pytorch() {
    let mut failures = Vec::new();
    for name in case_names("gan.json") {
        let diff = run_case(&name, "images");
        eprintln!("{name}: max difference {diff}/255");
        if diff > MAX_DIFF {
            failures.push(format!("{name}: {diff}/255"));
        }
    }
    assert!(failures.is_empty(), "beyond {MAX_DIFF}/255: {failures:?}");
}
