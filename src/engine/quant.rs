//! Quantized and float16 graphs: what tract cannot run (refused at load with
//! the `tools/quantize.py` option that avoids it), and how float16 graphs run.
//!
//! Measured with tract 0.23.9 and onnxruntime 1.32 (docs/quantization.md):
//! QDQ (QuantizeLinear/DequantizeLinear, per-tensor and per-channel),
//! DynamicQuantizeLinear, MatMulInteger and ConvInteger give onnxruntime's
//! outputs; onnxruntime's contrib operators (QOperator format: QLinearAdd,
//! QGemm, ...; com.microsoft domain) do not exist in tract; a float16 Gemm
//! with a bias fails in tract's Gemm expansion (it multiplies by a float32
//! beta), so float16 Gemms are rewritten as MatMul + Add before parsing.

use std::path::Path;

use anyhow::{bail, Result};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::transform::ModelTransform;

/// How a graph with float16 weights runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F16Mode {
    /// As written: float16 kernels (native on aarch64 with FP16 arithmetic).
    Native,
    /// Converted to float32 when optimized: weights take twice the memory
    /// but run on the float32 kernels, which are faster on CPUs without
    /// float16 arithmetic (x86: tract emulates float16 there).
    Float32,
}

impl F16Mode {
    /// `EDGEGEN_F16=native|f32` if set, else native only where the CPU does float16 arithmetic.
    pub fn from_env_or_cpu() -> F16Mode {
        match std::env::var("EDGEGEN_F16").as_deref() {
            Ok("native") => F16Mode::Native,
            Ok("f32") => F16Mode::Float32,
            Ok(other) => {
                log::warn!(
                    "EDGEGEN_F16={other} is neither 'native' nor 'f32'; using the CPU default"
                );
                Self::for_this_cpu()
            }
            Err(_) => Self::for_this_cpu(),
        }
    }

    pub fn for_this_cpu() -> F16Mode {
        if cpu_has_f16_arithmetic() {
            F16Mode::Native
        } else {
            F16Mode::Float32
        }
    }
}

#[cfg(target_arch = "aarch64")]
fn cpu_has_f16_arithmetic() -> bool {
    std::arch::is_aarch64_feature_detected!("fp16")
}

#[cfg(not(target_arch = "aarch64"))]
fn cpu_has_f16_arithmetic() -> bool {
    false
}

/// onnxruntime-only quantized operators (contrib ops of its QOperator format
/// and of its graph optimizer), which tract does not implement.
const ORT_CONTRIB_QUANTIZED_OPS: &[&str] = &[
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearConcat",
    "QLinearSoftmax",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearReduceMean",
    "QLinearWhere",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeLSTM",
    "MatMulNBits",
];

const REQUANTIZE_HINT: &str =
    "re-quantize the float32 model with `tools/quantize.py BUNDLE OUT --mode qdq` \
     (standard QuantizeLinear/DequantizeLinear around float ops) or `--mode dynamic`";

/// Refuses, before tract parses the graph, what tract cannot run in quantized
/// and float16 files, naming the operator and the quantize.py option that avoids it.
pub fn check_supported(path: &Path, proto: &ModelProto) -> Result<()> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    for node in &graph.node {
        let op = node.op_type.as_str();
        let contrib = !node.domain.is_empty() && node.domain != "ai.onnx";
        if ORT_CONTRIB_QUANTIZED_OPS.contains(&op) || (contrib && op.starts_with('Q')) {
            bail!(
                "{}: {} uses onnxruntime's operator '{op}'{}, which tract cannot run: {REQUANTIZE_HINT}",
                path.display(),
                node_label(node),
                domain_note(node)
            );
        }
        if matches!(op, "QuantizeLinear" | "DequantizeLinear") {
            check_quantize_node(path, graph, node)?;
        }
    }
    Ok(())
}

/// Exported graphs often have unnamed nodes: name them by their first output.
fn node_label(node: &NodeProto) -> String {
    match (node.name.is_empty(), node.output.first()) {
        (true, Some(output)) => format!("the node computing '{output}'"),
        _ => format!("node '{}'", node.name),
    }
}

fn domain_note(node: &NodeProto) -> String {
    if node.domain.is_empty() {
        String::new()
    } else {
        format!(" (domain {})", node.domain)
    }
}

/// tract quantizes to 8 bits (and dequantizes 8- and 32-bit integers) with
/// one scale per tensor or per axis; block-wise, 4- and 16-bit and float8
/// quantization are refused here.
fn check_quantize_node(
    path: &Path,
    graph: &tract_onnx::pb::GraphProto,
    node: &NodeProto,
) -> Result<()> {
    let op = node.op_type.as_str();
    if int_attr(node, "block_size").unwrap_or(0) != 0 {
        bail!(
            "{}: {}: '{op}' with block_size (blocked quantization) cannot run in tract: {REQUANTIZE_HINT} \
             (per-tensor, or --per-channel)",
            path.display(),
            node_label(node)
        );
    }
    // The zero point (input 2) fixes the integer type; absent means uint8.
    let Some(zero_point) = node.input.get(2).filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    let Some(init) = graph.initializer.iter().find(|t| &t.name == zero_point) else {
        return Ok(());
    };
    let supported: &[DataType] = if op == "QuantizeLinear" {
        &[DataType::Uint8, DataType::Int8]
    } else {
        &[DataType::Uint8, DataType::Int8, DataType::Int32]
    };
    let data_type = DataType::try_from(init.data_type).ok();
    if !data_type.is_some_and(|dt| supported.contains(&dt)) {
        let name = data_type.map_or_else(
            || format!("type {}", init.data_type),
            |dt| dt.as_str_name().to_string(),
        );
        bail!(
            "{}: {}: '{op}' with {name} values cannot run in tract (8-bit only): {REQUANTIZE_HINT} \
             (it writes uint8 activations and int8 weights)",
            path.display(),
            node_label(node)
        );
    }
    Ok(())
}

fn int_attr(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn float_attr(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// Whether the file stores float16 weights (or casts to float16 inside).
pub fn has_f16(proto: &ModelProto) -> bool {
    let Some(graph) = &proto.graph else {
        return false;
    };
    let f16 = DataType::Float16 as i32;
    graph.initializer.iter().any(|t| t.data_type == f16)
        || graph
            .node
            .iter()
            .any(|n| n.op_type == "Cast" && int_attr(n, "to") == Some(f16 as i64))
}

/// Rewrites each `Gemm` of a float16 graph (alpha = beta = 1, as exporters
/// write them) into `[Transpose] MatMul [+ Add]`, which tract runs in float16.
///
/// Why: tract 0.23.9's Gemm expansion multiplies the bias by a float32
/// `beta` constant, so a float16 Gemm with a bias fails to type
/// ("expected 1,32,F16 got 1,32,F32"). Returns how many nodes were rewritten.
pub fn rewrite_f16_gemms(proto: &mut ModelProto) -> usize {
    let Some(graph) = proto.graph.as_mut() else {
        return 0;
    };
    let mut rewritten = 0;
    let mut nodes = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let plain = float_attr(&node, "alpha").unwrap_or(1.0) == 1.0
            && float_attr(&node, "beta").unwrap_or(1.0) == 1.0;
        if node.op_type == "Gemm" && node.domain.is_empty() && plain && node.output.len() == 1 {
            nodes.extend(gemm_as_matmul(&node, rewritten));
            rewritten += 1;
        } else {
            nodes.push(node);
        }
    }
    graph.node = nodes;
    rewritten
}

fn gemm_as_matmul(gemm: &NodeProto, index: usize) -> Vec<NodeProto> {
    let prefix = format!("edgegen_gemm{index}");
    let mut nodes = Vec::new();
    let mut operand = |input: &str, transposed: bool, which: &str| -> String {
        if !transposed {
            return input.to_string();
        }
        let output = format!("{prefix}_{which}t");
        nodes.push(NodeProto {
            name: format!("{prefix}.transpose_{which}"),
            op_type: "Transpose".into(),
            input: vec![input.to_string()],
            output: vec![output.clone()],
            attribute: vec![AttributeProto {
                name: "perm".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
                ints: vec![1, 0],
                ..Default::default()
            }],
            ..Default::default()
        });
        output
    };
    let a = operand(
        &gemm.input[0],
        int_attr(gemm, "transA").unwrap_or(0) != 0,
        "a",
    );
    let b = operand(
        &gemm.input[1],
        int_attr(gemm, "transB").unwrap_or(0) != 0,
        "b",
    );
    let bias = gemm.input.get(2).filter(|c| !c.is_empty());
    let product = if bias.is_some() {
        format!("{prefix}_ab")
    } else {
        gemm.output[0].clone()
    };
    nodes.push(NodeProto {
        name: format!("{prefix}.matmul"),
        op_type: "MatMul".into(),
        input: vec![a, b],
        output: vec![product.clone()],
        ..Default::default()
    });
    if let Some(bias) = bias {
        nodes.push(NodeProto {
            name: format!("{prefix}.add"),
            op_type: "Add".into(),
            input: vec![product, bias.clone()],
            output: gemm.output.clone(),
            ..Default::default()
        });
    }
    nodes
}

/// Turns every float16 tensor and operation of a typed graph into float32.
pub fn upcast_f16(model: &mut TypedModel) -> TractResult<()> {
    FloatPrecisionTranslator::new(f16::datum_type(), f32::datum_type()).transform(model)?;
    fold_weight_casts(model)
}

/// Replaces each float16 constant cast to float32 by a float32 constant.
///
/// Why: tract's translator keeps float16 constants behind a cast, and the
/// cast stays in the optimized plan, so every run converted every weight
/// again: the SD-Turbo UNet as float16 ran 1.2–1.7× slower than as float32
/// (docs/benchmarks.md).
fn fold_weight_casts(model: &mut TypedModel) -> TractResult<()> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        if node
            .op_as::<Cast>()
            .is_none_or(|c| c.to != f32::datum_type())
        {
            continue;
        }
        let Some(konst) = model.node(node.inputs[0].node).op_as::<Const>() else {
            continue;
        };
        let weight = konst.val();
        if weight.datum_type() != f16::datum_type() || !weight.is_plain_ram() {
            continue;
        }
        let mut patch = TypedModelPatch::new(format!("fold float16 weight {}", node.name));
        let wire = patch.add_const(&node.name, weight.cast_to::<f32>()?.into_owned())?;
        patch.shunt_outside(model, id.into(), wire)?;
        patch.apply(model)?;
        folded += 1;
    }
    if folded > 0 {
        model.compact()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::einsum::EinSum;

    /// A float16 matrix product whose weight is above tract's constant
    /// folding budget (4 MiB), as in any SD-size float16 file.
    fn f16_product(k: usize, n: usize) -> TractResult<(TypedModel, Tensor)> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f16::fact([1, k]))?;
        let values: Vec<f16> = (0..k * n)
            .map(|i| f16::from_f32(((i % 17) as f32 - 8.0) / 16.0))
            .collect();
        let weight = tract_ndarray::Array2::from_shape_vec((k, n), values)?.into_tensor();
        let w = model.add_const("w", weight.clone())?;
        let op = EinSum::new("mk,kn->mn".parse()?, f16::datum_type());
        let y = model.wire_node("y", op, &[x, w])?;
        model.select_output_outlets(&y)?;
        Ok((model, weight))
    }

    #[test]
    fn large_float16_weights_become_float32_constants() -> TractResult<()> {
        let (k, n) = (1024, 2100);
        let (mut model, weight) = f16_product(k, n)?;
        upcast_f16(&mut model)?;
        let plan = model.into_optimized()?.into_runnable()?;
        let casts = plan
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op_is::<Cast>())
            .count();
        assert_eq!(casts, 0, "a cast is left in the plan");
        let x = tract_ndarray::Array2::from_shape_fn((1, k), |(_, i)| (i % 5) as f32 - 2.0);
        let y = plan.run(tvec!(x.clone().into_tensor().into()))?.remove(0);
        let y = y.to_plain_array_view::<f32>()?;
        let w = weight.cast_to::<f32>()?;
        let w = w
            .to_plain_array_view::<f32>()?
            .into_dimensionality::<tract_ndarray::Ix2>()?;
        let want = x.dot(&w);
        let diff = y
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-3, "max abs diff {diff}");
        Ok(())
    }
}
