//! The models shipped in `models/` make the pictures their reference
//! implementation (onnxruntime on the same ONNX files, the request's seed
//! drawn the way edgegen draws it) made for fixed prompts and seeds; the
//! references and the script that made them are under
//! `tests/fixtures/bundled/<model>/`. This catches a retrained or re-exported
//! bundle committed without new references, and any drift in the code path
//! from prompt to PNG.
//!
//! Tolerance: 2/255 per channel, the pipeline tests' bar (tract and
//! onnxruntime differ by float32 rounding, which can move a pixel on a
//! rounding boundary by one level; a wrong class, seed or truncation moves
//! pixels by tens of levels).

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, read_json};
use edgegen::bundle::Bundle;
use edgegen::config::Limits;
use edgegen::pipeline::{LoadOptions, Pipeline};
use edgegen::request::Request;

const MAX_DIFF: u8 = 2;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn reference_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures().join("bundled"))
        .expect("tests/fixtures/bundled")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("cases.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn reference_rgb(path: &Path) -> (u32, u32, Vec<u8>) {
    let picture = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (picture.width(), picture.height(), picture.into_raw())
}

/// Largest per-channel difference of each case, by name.
fn check_model(dir: &Path) -> Vec<(String, u8)> {
    let cases = read_json(&dir.join("cases.json"));
    let model = cases["model"].as_str().expect("model");
    let bundle = Bundle::open(&models_dir().join(model)).expect("bundled model");
    let pipeline = Pipeline::load(&bundle, LoadOptions::default()).expect("loads");
    let mut diffs = Vec::new();
    for case in cases["cases"].as_array().expect("cases") {
        let request = Request {
            prompt: Some(case["prompt"].as_str().expect("prompt").to_string()),
            seed: case["seed"].as_u64(),
            steps: case["steps"].as_u64().map(|s| s as u32),
            ..Request::default()
        };
        let settings = pipeline
            .resolve(&request, &Limits::default())
            .expect("resolves");
        let generated = pipeline
            .generate(&settings, &mut |_, _| true)
            .expect("generates");
        let picture = &generated.pictures[0];
        let png = case["png"].as_str().expect("png");
        let (width, height, want) = reference_rgb(&dir.join(png));
        assert_eq!(
            (picture.width, picture.height),
            (width, height),
            "{model} {png}: size"
        );
        let diff = picture
            .rgb
            .iter()
            .zip(&want)
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap_or(0);
        diffs.push((format!("{model} {png}"), diff));
    }
    diffs
}

#[test]
fn bundled_models_make_their_reference_pictures() {
    let dirs = reference_dirs();
    let models: Vec<String> = dirs
        .iter()
        .filter_map(|d| d.file_name()?.to_str().map(str::to_string))
        .collect();
    for model in ["scenes-gan", "scenes-sd"] {
        assert!(
            models.iter().any(|m| m == model),
            "no reference pictures for {model}: {models:?}"
        );
    }
    let mut failures = Vec::new();
    for dir in dirs {
        for (name, diff) in check_model(&dir) {
            eprintln!("{name}: max difference {diff}/255");
            if diff > MAX_DIFF {
                failures.push(format!("{name}: {diff}/255"));
            }
        }
    }
    assert!(failures.is_empty(), "beyond {MAX_DIFF}/255: {failures:?}");
}
