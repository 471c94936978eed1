//! Single ONNX components run by the engine equal PyTorch's outputs for the
//! same inputs (references/components-<bundle>.json), and the engine's errors
//! name the file, the input, the node and the operator.
//!
//! Tolerance: 1e-4 absolute. The components' outputs are O(1); float32
//! rounding differences between tract's and PyTorch's kernels (different
//! summation orders in matmul and convolution) stay below ~1e-5 here, so a
//! wrong op (layout, padding, attention) is far outside.

mod common;

use common::{array, fixtures, named_inputs, read_json};
use edgegen::engine::{ElementType, Input, MatrixPath, ModelOptions, OnnxModel};
use ndarray::{ArrayD, IxDyn};

const TOLERANCE: f32 = 1e-4;

fn check_component(bundle: &str, component: &str) -> f32 {
    check_component_with(bundle, component, &ModelOptions::default()).0
}

/// The max abs difference to PyTorch's output, and the model (with its plan).
fn check_component_with(bundle: &str, component: &str, options: &ModelOptions) -> (f32, OnnxModel) {
    let reference = read_json(&fixtures().join(format!("references/components-{bundle}.json")));
    let call = &reference[component];
    let path = fixtures().join(format!("bundles/{bundle}/{component}/model.onnx"));
    let model = OnnxModel::open(&path, options).unwrap();
    let inputs = named_inputs(&call["inputs"]);
    let outputs = model.run(inputs).unwrap();
    let (name, expected) = call["outputs"].as_object().unwrap().iter().next().unwrap();
    let (shape, want) = array(expected);
    let index = model.outputs().iter().position(|o| o == name).unwrap_or(0);
    assert_eq!(
        outputs[index].shape(),
        shape.as_slice(),
        "{bundle}/{component} output shape"
    );
    let diff = outputs[index]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    (diff, model)
}

#[test]
fn components_equal_pytorch() {
    for bundle in ["tiny-sd", "tiny-sd-i64", "tiny-lcm", "tiny-sd-taesd"] {
        for component in ["unet", "vae_decoder"] {
            let diff = check_component(bundle, component);
            assert!(
                diff <= TOLERANCE,
                "{bundle}/{component}: max abs diff {diff}"
            );
        }
    }
}

/// Every float convolution and matrix product on the gemm matrix path, the
/// fixtures' small ones included (by size they would stay with tract): the
/// same tolerance against PyTorch, and both kinds of op in use.
#[test]
fn components_on_the_gemm_path_equal_pytorch() {
    let options = ModelOptions {
        matrix_path: MatrixPath::GemmAll,
        ..ModelOptions::default()
    };
    let mut ops = std::collections::BTreeMap::new();
    for bundle in ["tiny-sd", "tiny-lcm", "tiny-sd-taesd"] {
        for component in ["unet", "vae_decoder"] {
            let (diff, model) = check_component_with(bundle, component, &options);
            assert!(
                diff <= TOLERANCE,
                "{bundle}/{component} on the gemm path: max abs diff {diff}"
            );
            for (op, n) in model.plan_op_counts().unwrap() {
                *ops.entry(op).or_insert(0) += n;
            }
        }
    }
    for op in ["GemmConv", "GemmProduct"] {
        assert!(
            ops.get(op).is_some_and(|&n| n > 0),
            "no {op} in the plans: {ops:?}"
        );
    }
}

/// With a slice budget of a few bytes every attention block runs one query row
/// at a time: the plan has more softmaxes, and the outputs still equal PyTorch's.
#[test]
fn attention_in_slices_equals_pytorch() {
    let whole = ModelOptions {
        attention_slice_bytes: None,
        ..ModelOptions::default()
    };
    let sliced = ModelOptions {
        attention_slice_bytes: Some(16),
        ..ModelOptions::default()
    };
    for bundle in ["tiny-sd", "tiny-lcm"] {
        for component in ["unet", "vae_decoder"] {
            let (diff, in_slices) = check_component_with(bundle, component, &sliced);
            assert!(
                diff <= TOLERANCE,
                "{bundle}/{component} in slices: max abs diff {diff}"
            );
            let (_, at_once) = check_component_with(bundle, component, &whole);
            let softmaxes = |model: &OnnxModel| {
                let counts = model.plan_op_counts().unwrap();
                counts.get("Softmax").copied().unwrap_or(0)
            };
            let (before, after) = (softmaxes(&at_once), softmaxes(&in_slices));
            assert!(before > 0, "{bundle}/{component}: no attention found");
            assert!(
                after > before,
                "{bundle}/{component}: {before} softmaxes whole, {after} in slices"
            );
        }
    }
}

#[test]
fn input_specs_come_from_the_graph() {
    let unet = OnnxModel::load(&fixtures().join("bundles/tiny-sd/unet/model.onnx")).unwrap();
    let timestep = unet.input("timestep").unwrap();
    assert_eq!(timestep.element, ElementType::F32);
    assert_eq!(timestep.rank(), Some(0));
    let unet = OnnxModel::load(&fixtures().join("bundles/tiny-sd-i64/unet/model.onnx")).unwrap();
    let timestep = unet.input("timestep").unwrap();
    assert_eq!(timestep.element, ElementType::I64);
    assert_eq!(timestep.rank(), Some(1));
    let encoder =
        OnnxModel::load(&fixtures().join("bundles/tiny-sd/text_encoder/model.onnx")).unwrap();
    assert_eq!(encoder.inputs()[0].element, ElementType::I32);
}

#[test]
fn one_plan_per_shape() {
    let vae = OnnxModel::load(&fixtures().join("bundles/tiny-sd/vae_decoder/model.onnx")).unwrap();
    let a = vae.plan(&[vec![1, 4, 4, 4]]).unwrap();
    let b = vae.plan(&[vec![1, 4, 4, 4]]).unwrap();
    let c = vae.plan(&[vec![1, 4, 8, 4]]).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
}

#[test]
fn wrong_input_name_is_named() {
    let vae = OnnxModel::load(&fixtures().join("bundles/tiny-sd/vae_decoder/model.onnx")).unwrap();
    let latents = ArrayD::zeros(IxDyn(&[1, 4, 4, 4]));
    let err = vae
        .run(vec![("latents", Input::Float(latents))])
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("latent_sample") && text.contains("vae_decoder/model.onnx"),
        "{text}"
    );
}

#[test]
fn missing_and_corrupt_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("model.onnx");
    let err = OnnxModel::load(&missing).unwrap_err();
    assert!(
        format!("{err:#}").contains("model.onnx: file not found"),
        "{err:#}"
    );
    let source = std::fs::read(fixtures().join("bundles/tiny-sd/vae_decoder/model.onnx")).unwrap();
    std::fs::write(&missing, &source[..source.len() / 3]).unwrap();
    let err = OnnxModel::load(&missing).unwrap_err();
    assert!(format!("{err:#}").contains("model.onnx"), "{err:#}");
}

#[test]
fn unsupported_operator_is_named_with_its_node() {
    let path = fixtures().join("broken/unsupported_op.onnx");
    let err = OnnxModel::load(&path).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("unsupported_op.onnx")
            && text.contains("'determinant'")
            && text.contains("'Det'"),
        "{text}"
    );
}
