//! The `edgegen` binary as a user runs it: generate from a fixture bundle,
//! and one-line errors with the right exit code for broken input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{copy_dir, fixtures};

fn edgegen(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgegen"))
        .args(args)
        .current_dir(dir)
        .env("EDGEGEN_LOG", "warn")
        .output()
        .expect("run edgegen")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn bundle_copy(scratch: &Path, edit: impl FnOnce(&Path)) -> String {
    let dir = scratch.join("bundle");
    copy_dir(&fixtures().join("bundles/tiny-sd"), &dir);
    edit(&dir);
    dir.to_string_lossy().into_owned()
}

fn generate_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red apple on a tree",
        "--seed",
        "42",
    ];
    args.extend_from_slice(extra);
    args
}

/// The README's first command, run where the README runs it: the repository's
/// configuration picks the bundled default model.
#[test]
fn readme_command_uses_the_bundled_default_model() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("apple.png");
    let output = Command::new(env!("CARGO_BIN_EXE_edgegen"))
        .args([
            "generate",
            "--prompt",
            "a red apple on a green tree",
            "--seed",
            "42",
        ])
        .arg("--output")
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("EDGEGEN_LOG", "warn")
        .env("EDGEGEN_ENGINE_CACHE_DIR", "off")
        .output()
        .expect("run edgegen");
    assert!(output.status.success(), "{}", stderr(&output));
    let png = std::fs::read(&out).unwrap();
    let parameters = edgegen::picture::read_parameters(&png)
        .unwrap()
        .expect("parameters chunk");
    for field in ["Model: scenes-sd", "Size: 64x64", "Seed: 42"] {
        assert!(parameters.contains(field), "{field} not in {parameters}");
    }
}

#[test]
fn generate_writes_png_with_parameters_and_sidecar() {
    let scratch = tempfile::tempdir().unwrap();
    let model = fixtures().join("bundles/tiny-sd");
    let model = model.to_str().unwrap();
    let args = generate_args(
        model,
        &[
            "--steps",
            "8",
            "--scheduler",
            "euler",
            "--output",
            "out.png",
        ],
    );
    let output = edgegen(&args, scratch.path());
    assert!(output.status.success(), "{}", stderr(&output));
    let png = std::fs::read(scratch.path().join("out.png")).unwrap();
    let parameters = edgegen::picture::read_parameters(&png)
        .unwrap()
        .expect("parameters chunk");
    assert!(
        parameters.starts_with("a red apple on a tree\n"),
        "{parameters}"
    );
    for field in [
        "Steps: 8",
        "Sampler: euler",
        "CFG scale: 7.5",
        "Seed: 42",
        "Size: 64x64",
        "Model: tiny-sd",
    ] {
        assert!(
            parameters.contains(field),
            "{field} missing in {parameters}"
        );
    }
    let sidecar = common::read_json(&scratch.path().join("out.json"));
    assert_eq!(sidecar["settings"]["seed"], 42);
    assert_eq!(
        sidecar["sha256"].as_str().unwrap(),
        edgegen::generate::hex_sha256(&png)
    );
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn same_seed_same_picture() {
    let scratch = tempfile::tempdir().unwrap();
    let model = fixtures().join("bundles/tiny-sd");
    let model = model.to_str().unwrap();
    for name in ["a.png", "b.png"] {
        let output = edgegen(
            &generate_args(model, &["--steps", "2", "--output", name]),
            scratch.path(),
        );
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let a = std::fs::read(scratch.path().join("a.png")).unwrap();
    let b = std::fs::read(scratch.path().join("b.png")).unwrap();
    assert_eq!(a, b);
}

/// Runs a failing command and checks: exit code, one line, the expected words.
fn assert_fails(output: Output, code: i32, words: &[&str]) {
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(code), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {text}");
    assert!(!text.contains("panicked"), "{text}");
    for word in words {
        assert!(text.contains(word), "'{word}' missing in: {text}");
    }
}

#[test]
fn missing_file_is_named() {
    let scratch = tempfile::tempdir().unwrap();
    let model = bundle_copy(scratch.path(), |dir| {
        std::fs::remove_file(dir.join("unet/model.onnx")).unwrap()
    });
    let output = edgegen(
        &generate_args(&model, &["--output", "x.png"]),
        scratch.path(),
    );
    assert_fails(output, 1, &["missing unet/model.onnx"]);
    assert!(!scratch.path().join("x.png").exists());
}

#[test]
fn wrong_input_name_is_named() {
    let scratch = tempfile::tempdir().unwrap();
    let model = bundle_copy(scratch.path(), |dir| {
        std::fs::copy(
            dir.join("vae_decoder/model.onnx"),
            dir.join("unet/model.onnx"),
        )
        .unwrap();
    });
    let output = edgegen(
        &generate_args(&model, &["--output", "x.png"]),
        scratch.path(),
    );
    assert_fails(
        output,
        1,
        &["unet/model.onnx", "no input 'sample'", "latent_sample"],
    );
}

#[test]
fn unsupported_operator_is_named() {
    let scratch = tempfile::tempdir().unwrap();
    let model = bundle_copy(scratch.path(), |dir| {
        std::fs::copy(
            fixtures().join("broken/unsupported_op.onnx"),
            dir.join("vae_decoder/model.onnx"),
        )
        .unwrap();
    });
    let output = edgegen(
        &generate_args(&model, &["--output", "x.png"]),
        scratch.path(),
    );
    assert_fails(
        output,
        1,
        &["vae_decoder/model.onnx", "'determinant'", "'Det'"],
    );
}

#[test]
fn size_not_multiple_of_8_is_a_usage_error() {
    let scratch = tempfile::tempdir().unwrap();
    let model = fixtures().join("bundles/tiny-sd");
    let output = edgegen(
        &generate_args(
            model.to_str().unwrap(),
            &["--width", "60", "--output", "x.png"],
        ),
        scratch.path(),
    );
    assert_fails(output, 2, &["width", "60", "multiple of 8"]);
    assert!(!scratch.path().join("x.png").exists());
}

#[test]
fn too_many_steps_is_a_usage_error() {
    let scratch = tempfile::tempdir().unwrap();
    let model = fixtures().join("bundles/tiny-sd");
    let output = edgegen(
        &generate_args(
            model.to_str().unwrap(),
            &["--steps", "500", "--output", "x.png"],
        ),
        scratch.path(),
    );
    assert_fails(output, 2, &["steps", "500", "between 1 and 50"]);
}

#[test]
fn unknown_scheduler_lists_the_valid_ones() {
    let scratch = tempfile::tempdir().unwrap();
    let model = fixtures().join("bundles/tiny-sd");
    let output = edgegen(
        &generate_args(
            model.to_str().unwrap(),
            &["--scheduler", "plms", "--output", "x.png"],
        ),
        scratch.path(),
    );
    assert_fails(
        output,
        2,
        &["scheduler", "plms", "euler_a", "dpmpp_2m_karras"],
    );
}

#[test]
fn gan_class_errors_list_the_classes() {
    let scratch = tempfile::tempdir().unwrap();
    let model = fixtures().join("bundles/gan-class");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--class",
        "banana",
        "--output",
        "x.png",
    ];
    assert_fails(
        edgegen(&args, scratch.path()),
        2,
        &["class", "banana", "apple, tree, sun, car"],
    );
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "4",
        "--class",
        "sun",
    ];
    assert_fails(edgegen(&args, scratch.path()), 2, &["steps"]);
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a sun",
        "--batch",
        "2",
        "--output",
        "g.png",
    ];
    let output = edgegen(&args, scratch.path());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(scratch.path().join("g.png").exists() && scratch.path().join("g-2.png").exists());
}

#[test]
fn models_list_shows_kinds_classes_and_broken_bundles() {
    let scratch = tempfile::tempdir().unwrap();
    let models = scratch.path().join("models");
    copy_dir(
        &fixtures().join("bundles/gan-class"),
        &models.join("gan-class"),
    );
    copy_dir(&fixtures().join("bundles/tiny-sd"), &models.join("tiny-sd"));
    std::fs::create_dir_all(models.join("half-copied")).unwrap();
    std::fs::write(
        scratch.path().join("edgegen.toml"),
        "[models]\ndir = \"models\"\n",
    )
    .unwrap();
    let output = edgegen(
        &["--config", "edgegen.toml", "models", "list"],
        scratch.path(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("gan-class\tgan") && text.contains("classes: apple, tree, sun, car"),
        "{text}"
    );
    assert!(text.contains("tiny-sd\tdiffusion"), "{text}");
    assert!(
        text.contains("half-copied\tbroken") && text.contains("missing text_encoder/model.onnx"),
        "{text}"
    );
    let output = edgegen(
        &["--config", "edgegen.toml", "models", "inspect", "tiny-sd"],
        scratch.path(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("input  timestep float32 []") && text.contains("weights f32"),
        "{text}"
    );
    assert!(text.contains("scheduler euler"), "{text}");
}
