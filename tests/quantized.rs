//! Quantized graphs (int8 QDQ, QLinearConv, dynamic int8, float16) run by the engine give
//! onnxruntime's outputs for the same files and inputs
//! (tests/fixtures/quantized/, made by tools/fixtures/quantized.py with
//! tools/quantize.py), and files tract cannot run are refused with the
//! operator's name and the quantize.py option that avoids it.

mod common;

use common::{array, fixtures, input_value, named_inputs, read_json};
use edgegen::engine::{F16Mode, OnnxModel};
use serde_json::Value;

/// int8 files, tract vs onnxruntime, max abs difference (outputs are within ±1.5).
///
/// Both runtimes compute the same integers: the weights are stored quantized,
/// activations are quantized with the scales and zero points in the file, with
/// rounding half to even. They differ in how the products are summed:
/// onnxruntime fuses DequantizeLinear → Conv → QuantizeLinear into integer
/// kernels (exact int32 sums, then a float requantization), tract computes the
/// float convolution of the dequantized values. The float sum differs from the
/// exact one by ~1e-7 relative, which only matters when a value lands within
/// that distance of a rounding boundary: then one activation moves by one
/// quantization step (1/255 of its calibrated range), and downstream outputs by
/// about that step times the layer gains, up to ~1e-3 here. On this machine no
/// value did (measured max 5e-7); the bound leaves room for a few such flips on
/// other CPUs. The int8 error itself (vs the float32 graph) is 2e-2–6e-2 on
/// these inputs, far above it, so running the graph in float, or with wrong
/// scales, zero points or rounding, fails.
const INT8_TOLERANCE: f32 = 1e-3;

/// float16 files run as float32 (the x86 default), vs onnxruntime, in units
/// of float16 resolution at the output's largest magnitude (2^-10 × max |y|).
///
/// onnxruntime on x86 runs most float16 nodes by casting to float32 and back,
/// so some of its intermediate values are rounded to float16; tract, having
/// converted the whole graph to float32, rounds none. Measured: up to 1.2
/// steps (2.4e-3 on text-encoder outputs up to 2.7).
const F16_AS_F32_STEPS: f32 = 4.0;

/// float16 files run with float16 arithmetic (`F16Mode::Native`, the aarch64
/// default), vs onnxruntime, in the same units. tract's float16 kernels also
/// round their sums to float16 (onnxruntime sums in float32), and the
/// roundings add up over the layers: measured 1.5 steps on the text encoder
/// and 14.6 on the GAN generator (its convolutions sum over up to 1152 terms).
const F16_NATIVE_STEPS: f32 = 32.0;

const INT8_FILES: &[&str] = &[
    "unet-qdq",
    "taesd_decoder-qdq-per-channel",
    "taesd_decoder-qlinear",
    "generator-dynamic-conv",
];
const F16_FILES: &[&str] = &["text_encoder-f16", "generator-f16", "unet-f16"];

fn references() -> Value {
    read_json(&fixtures().join("quantized/references.json"))
}

fn model_path(stem: &str) -> std::path::PathBuf {
    fixtures().join(format!("quantized/{stem}.onnx"))
}

/// Max abs difference between the engine's output and onnxruntime's.
fn diff_to_onnxruntime(references: &Value, stem: &str, f16_mode: F16Mode) -> f32 {
    let record = &references["files"][stem];
    let source = record["inputs"].as_str().unwrap();
    let model = OnnxModel::load_with(&model_path(stem), f16_mode).unwrap();
    let inputs = named_inputs(&references["inputs"][source]);
    let outputs = model.run(inputs).unwrap();
    let (shape, want) = array(&record["output"]);
    assert_eq!(outputs[0].shape(), shape.as_slice(), "{stem}: output shape");
    outputs[0]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// float16's resolution at the largest output magnitude of the float32 graph.
fn f16_step(record: &Value) -> f32 {
    let max_abs = record["float32_output_max_abs"].as_f64().unwrap() as f32;
    max_abs / 1024.0
}

fn check(files: &[&str], f16_mode: F16Mode, tolerance: impl Fn(&Value) -> f32) {
    let references = references();
    for stem in files {
        let diff = diff_to_onnxruntime(&references, stem, f16_mode);
        let tolerance = tolerance(&references["files"][stem]);
        assert!(
            diff <= tolerance,
            "{stem} ({f16_mode:?}): max abs diff to onnxruntime {diff} > {tolerance}"
        );
    }
}

#[test]
fn int8_graphs_match_onnxruntime() {
    check(INT8_FILES, F16Mode::for_this_cpu(), |_| INT8_TOLERANCE);
}

#[test]
fn int8_tolerance_is_far_below_the_quantization_error() {
    let references = references();
    for stem in INT8_FILES {
        let error = references["files"][stem]["max_abs_diff_vs_float32"]
            .as_f64()
            .unwrap() as f32;
        assert!(
            error > 10.0 * INT8_TOLERANCE,
            "{stem}: int8 error {error} too small to tell a quantized run from a float one"
        );
    }
}

#[test]
fn f16_graphs_run_as_f32_match_onnxruntime() {
    check(F16_FILES, F16Mode::Float32, |record| {
        F16_AS_F32_STEPS * f16_step(record)
    });
}

#[test]
fn f16_graphs_run_natively_match_onnxruntime() {
    check(F16_FILES, F16Mode::Native, |record| {
        F16_NATIVE_STEPS * f16_step(record)
    });
}

#[test]
fn summaries_name_the_weight_format() {
    let expected = [
        ("unet-qdq", "int8 (QDQ)"),
        ("taesd_decoder-qdq-per-channel", "int8 (QDQ)"),
        ("taesd_decoder-qlinear", "int8 (QOperator)"),
        ("generator-dynamic-conv", "int8 (dynamic)"),
        ("text_encoder-f16", "f16"),
        ("generator-f16", "f16"),
    ];
    for (stem, format) in expected {
        let model = OnnxModel::load(&model_path(stem)).unwrap();
        assert_eq!(model.summary().quantization(), format, "{stem}");
    }
    let float = OnnxModel::load(&fixtures().join("bundles/tiny-sd/unet/model.onnx")).unwrap();
    assert_eq!(float.summary().quantization(), "f32");
}

#[test]
fn ops_tract_cannot_run_are_named_with_the_option_that_avoids_them() {
    let references = references();
    for stem in ["taesd_decoder-qoperator", "int16-qdq"] {
        let op = references["unsupported"][stem]["unsupported_op"]
            .as_str()
            .unwrap();
        let error = OnnxModel::load(&model_path(stem)).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains(stem), "{message}");
        assert!(message.contains(&format!("'{op}'")), "{message}");
        assert!(
            message.contains("tools/quantize.py") && message.contains("--mode qdq"),
            "{message}"
        );
    }
}

/// A known difference, kept visible (docs/quantization.md): ONNX's
/// QuantizeLinear is `round_half_to_even(x / scale)`, tract computes
/// `round_half_to_even(x * (1 / scale))`. The two quotients can differ in the
/// last bit, which only matters for an input exactly on a rounding tie: there
/// the result may be one step off. Inputs a quarter step away from a tie must
/// agree exactly. If tract starts dividing, `mismatched_ties` drops to 0 and
/// this still passes.
#[test]
fn quantize_linear_differs_from_onnxruntime_only_on_exact_ties_by_one_step() {
    let references = references();
    let record = &references["quantize_ties"];
    let ties = record["ties"].as_u64().unwrap() as usize;
    let model = OnnxModel::load(&model_path("quantize-ties")).unwrap();
    let output = model
        .run(vec![("x", input_value(&record["inputs"]["x"]))])
        .unwrap()
        .remove(0);
    let (_, want) = array(&record["output"]);
    let got: Vec<f32> = output.iter().copied().collect();
    let (at_ties, between) = got.split_at(ties);
    let (want_at_ties, want_between) = want.split_at(ties);
    assert_eq!(
        between, want_between,
        "inputs away from ties must quantize identically"
    );
    let mismatched_ties = at_ties
        .iter()
        .zip(want_at_ties)
        .filter(|(a, b)| a != b)
        .inspect(|(a, b)| assert_eq!((*a - *b).abs(), 1.0, "a tie is off by more than one step"))
        .count();
    let predicted = record["ties_where_reciprocal_differs"].as_u64().unwrap() as usize;
    assert!(
        mismatched_ties == predicted || mismatched_ties == 0,
        "{mismatched_ties} ties differ; x * (1 / scale) predicts {predicted}"
    );
}
