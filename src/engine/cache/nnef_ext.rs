//! NNEF forms for ops tract's ONNX front end and declutter produce but tract
//! 0.23.9 cannot save: the fused exact GELU (every CLIP text encoder and UNet
//! feed-forward), the per-tensor QuantizeLinear / DequantizeLinear of QDQ
//! int8 graphs and the 256-entry lookup table declutter makes of an
//! activation between them. Scales travel as their f32 bit patterns so a
//! saved graph quantizes exactly as the one it was saved from.

use std::any::TypeId;

use tract_nnef::internal::*;
use tract_nnef::ser::{ints, invocation, numeric};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::GeluExact;
use tract_onnx::tract_core::ops::quant::{
    DequantizeLinearF32, LookupTable, QuantizeLinearI8, QuantizeLinearU8,
};

const QUANTIZE_U8: &str = "edgegen_quantize_linear_u8";
const QUANTIZE_I8: &str = "edgegen_quantize_linear_i8";
const DEQUANTIZE: &str = "edgegen_dequantize_linear_f32";
const LOOKUP_TABLE: &str = "edgegen_lookup_table";

pub fn registry() -> Registry {
    let mut registry = Registry::new("edgegen");
    registry.register_unit_element_wise("edgegen_gelu_exact", &GeluExact {});
    register_quantize::<QuantizeLinearU8>(&mut registry, QUANTIZE_U8, load_quantize_u8, |op| {
        Affine::of(op.scale, op.zero_point)
    });
    register_quantize::<QuantizeLinearI8>(&mut registry, QUANTIZE_I8, load_quantize_i8, |op| {
        Affine::of(op.scale, op.zero_point)
    });
    registry.register_element_wise(
        LOOKUP_TABLE,
        TypeId::of::<LookupTable>(),
        Box::new(save_lookup_table),
        vec![
            TypeName::Scalar.tensor().named("input"),
            TypeName::Integer.array().named("table"),
        ],
        load_lookup_table,
    );
    registry.register_dumper(save_dequantize);
    registry.register_primitive(
        DEQUANTIZE,
        &scale_and_zero_point(),
        &[("output", TypeName::Scalar.tensor())],
        load_dequantize,
    );
    registry
}

fn register_quantize<T: ElementWiseMiniOp>(
    registry: &mut Registry,
    id: &'static str,
    load: ToTract,
    affine: fn(&T) -> Affine,
) {
    registry.register_element_wise(
        id,
        TypeId::of::<T>(),
        Box::new(move |ast, node| {
            let op = mini_op::<T>(node)?;
            Ok(Some(quantize_call(ast, node, id, affine(op))))
        }),
        scale_and_zero_point(),
        load,
    );
}

fn scale_and_zero_point() -> Vec<Parameter> {
    vec![
        TypeName::Scalar.tensor().named("input"),
        TypeName::Integer.named("scale_bits"),
        TypeName::Integer.named("zero_point"),
    ]
}

fn mini_op<T: ElementWiseMiniOp>(node: &TypedNode) -> TractResult<&T> {
    node.op_as::<ElementWiseOp>()
        .and_then(|op| op.0.downcast_ref::<T>())
        .with_context(|| format!("node {} is not a {}", node.name, std::any::type_name::<T>()))
}

/// A (de)quantization's parameters: real = (q - zero_point) * scale.
struct Affine {
    scale: f32,
    zero_point: i64,
}

impl Affine {
    fn of(scale: f32, zero_point: impl Into<i64>) -> Affine {
        Affine {
            scale,
            zero_point: zero_point.into(),
        }
    }
}

fn quantize_call(ast: &IntoAst, node: &TypedNode, id: &str, affine: Affine) -> Arc<RValue> {
    let input = ast.mapping[&node.inputs[0]].clone();
    invocation(
        id,
        &[input],
        &[
            ("scale_bits", numeric(i64::from(affine.scale.to_bits()))),
            ("zero_point", numeric(affine.zero_point)),
        ],
    )
}

fn scale_and_zero_point_of(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
) -> TractResult<(OutletId, f32, i64)> {
    let input = invocation.named_arg_as(builder, "input")?;
    let bits: i64 = invocation.named_arg_as(builder, "scale_bits")?;
    let bits = u32::try_from(bits).context("scale_bits out of range")?;
    let zero_point = invocation.named_arg_as(builder, "zero_point")?;
    Ok((input, f32::from_bits(bits), zero_point))
}

fn load_quantize_u8(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
) -> TractResult<Value> {
    let (input, scale, zero_point) = scale_and_zero_point_of(builder, invocation)?;
    let zero_point = u8::try_from(zero_point).context("u8 zero point out of range")?;
    let op = QuantizeLinearU8 { scale, zero_point };
    builder.wire(ElementWiseOp(Box::new(op), None), &[input])
}

fn load_quantize_i8(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
) -> TractResult<Value> {
    let (input, scale, zero_point) = scale_and_zero_point_of(builder, invocation)?;
    let zero_point = i8::try_from(zero_point).context("i8 zero point out of range")?;
    let op = QuantizeLinearI8 { scale, zero_point };
    builder.wire(ElementWiseOp(Box::new(op), None), &[input])
}

fn save_dequantize(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &DequantizeLinearF32,
) -> TractResult<Option<Arc<RValue>>> {
    Ok(Some(quantize_call(
        ast,
        node,
        DEQUANTIZE,
        Affine::of(op.scale, op.zero_point),
    )))
}

fn load_dequantize(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
) -> TractResult<Value> {
    let (input, scale, zero_point) = scale_and_zero_point_of(builder, invocation)?;
    let zero_point = i32::try_from(zero_point).context("zero point out of range")?;
    builder.wire(DequantizeLinearF32 { scale, zero_point }, &[input])
}

fn save_lookup_table(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let op = mini_op::<LookupTable>(node)?;
    let table: Vec<usize> = op.table.table().iter().map(|&v| usize::from(v)).collect();
    let input = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(
        LOOKUP_TABLE,
        &[input],
        &[("table", ints(&table))],
    )))
}

fn load_lookup_table(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
) -> TractResult<Value> {
    let input = invocation.named_arg_as(builder, "input")?;
    let table: TVec<usize> = invocation.named_arg_as(builder, "table")?;
    let table = table
        .iter()
        .map(|&v| u8::try_from(v).context("lookup table entry out of range"))
        .collect::<TractResult<Vec<u8>>>()?;
    let op = LookupTable {
        table: tract_linalg::routines::lut_u8(&table)?,
    };
    builder.wire(ElementWiseOp(Box::new(op), None), &[input])
}
