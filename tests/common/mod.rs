//! Helpers shared by the integration tests: fixture paths, reference arrays,
//! and bundle copies with edited configuration.
#![allow(dead_code)]

pub mod tmpfs;

use std::path::{Path, PathBuf};

use edgegen::engine::Input;
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A reference array: `{"shape": [...], "data": [...]}` → (shape, values).
pub fn array(value: &Value) -> (Vec<usize>, Vec<f32>) {
    let shape = value["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let data = value["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect();
    (shape, data)
}

/// Copies a directory tree (bundles are small) so a test can edit its files.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The largest per-channel difference between 8-bit pictures and a float
/// reference in [0, 1] converted like diffusers' `numpy_to_pil` (`round(x * 255)`).
pub fn max_u8_diff(rgb: &[u8], reference: &[f32]) -> u8 {
    assert_eq!(
        rgb.len(),
        reference.len(),
        "picture size differs from the reference"
    );
    rgb.iter()
        .zip(reference)
        .map(|(&got, &want)| {
            let want = (want.clamp(0.0, 1.0) * 255.0).round() as i32;
            (i32::from(got) - want).unsigned_abs() as u8
        })
        .max()
        .unwrap_or(0)
}

/// A reference array as a graph input, int64 or float32 as its `dtype` says.
pub fn input_value(value: &Value) -> Input {
    let (shape, data) = array(value);
    if value["dtype"].as_str() == Some("int64") {
        let ints = data.iter().map(|&v| v as i64).collect();
        Input::Int(ArrayD::from_shape_vec(IxDyn(&shape), ints).unwrap())
    } else {
        Input::Float(ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap())
    }
}

/// A reference's `{name: array}` inputs as named graph inputs.
pub fn named_inputs(inputs: &Value) -> Vec<(&str, Input)> {
    inputs
        .as_object()
        .expect("inputs object")
        .iter()
        .map(|(name, value)| (name.as_str(), input_value(value)))
        .collect()
}
