//! The matrix path: convolutions and large matrix products of a plan routed
//! to the `gemm` crate's kernels instead of tract's.
//!
//! Measured on the Stable Diffusion components (docs/benchmarks.md), tract's
//! matrix kernels run these shapes at about half the throughput of `gemm`'s,
//! and its 3×3 convolutions copy an im2col matrix on every run. Routing is a
//! rewrite of the decluttered graph ahead of codegen, so the compile cache,
//! which saves decluttered graphs, is the same on either path; what is left
//! (small, depthwise, grouped, quantized or float16 work) goes through tract
//! as before.

mod call;
mod conv;
mod product;
mod scratch;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::conv::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;

pub use call::set_threads;
pub use conv::GemmConv;
pub use product::GemmProduct;
pub use scratch::release as release_scratch;

use conv::{Geometry, Layout};

/// Which shapes go to the matrix path.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// Below this many multiply-adds a convolution or product stays with
    /// tract, which fuses it with its neighbours: the bundled 64² models'
    /// convolutions (at most 38 M) ran 10 % slower on the matrix path.
    pub min_macs: usize,
    /// Shifted taps multiply cin-deep slices; with fewer input channels the
    /// slices are too thin and one im2col product is faster.
    pub min_tap_depth: usize,
    /// A product with a weight operand needs each weight used this many
    /// times (the activation's rows) to go to the matrix path: tract packs
    /// a weight once per plan, the `gemm` crate on every call, which a text
    /// encoder's 77 tokens do not repay (measured: docs/benchmarks.md).
    pub min_weight_reuse: usize,
    /// Up to this many output pixels, with at least `im2col_min_cin` input
    /// channels, one im2col product beats the shifted taps: each tap's
    /// product then packs a large weight slice for few columns (a UNet's
    /// 16² level with 1280 channels: 37 against 64 ms on two threads). With
    /// few channels the taps win at every size (TAESD's 64 channels).
    pub im2col_max_pixels: usize,
    pub im2col_min_cin: usize,
    /// ... as long as the im2col matrix stays this small.
    pub im2col_max_bytes: usize,
}

pub const RULE: Rule = Rule {
    min_macs: 1 << 26,
    min_tap_depth: 32,
    min_weight_reuse: 256,
    im2col_max_pixels: 64 * 64,
    im2col_min_cin: 128,
    im2col_max_bytes: 64 << 20,
};

/// Which kernels run a graph's convolutions and large matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatrixPath {
    /// The `gemm` crate, for the shapes where it is measured faster.
    Gemm,
    /// The `gemm` crate for every float convolution and product it can run,
    /// however small: how tests run the path on small fixture models.
    GemmAll,
    /// tract's own kernels for everything.
    Tract,
}

impl MatrixPath {
    /// `EDGEGEN_ENGINE_MATMUL` (the variable that sets `engine.matmul`) when
    /// it says `gemm` or `tract`, else this architecture's default: for code
    /// that opens models without a configuration (tests, tools).
    pub fn from_env_or_cpu() -> MatrixPath {
        match std::env::var("EDGEGEN_ENGINE_MATMUL").as_deref() {
            Ok("gemm") => MatrixPath::Gemm,
            Ok("tract") => MatrixPath::Tract,
            _ => Self::for_this_cpu(),
        }
    }

    /// Measured on x86_64. Elsewhere (ARM boards, measured only under qemu,
    /// which gives no timings) tract's kernels stay the default until a
    /// board measures the difference.
    pub fn for_this_cpu() -> MatrixPath {
        if cfg!(target_arch = "x86_64") {
            MatrixPath::Gemm
        } else {
            MatrixPath::Tract
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MatrixPath::Gemm => "gemm",
            MatrixPath::GemmAll => "gemm (every size)",
            MatrixPath::Tract => "tract",
        }
    }
}

/// What a routing pass moved to the matrix path, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routed(pub BTreeMap<&'static str, usize>);

impl Routed {
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }
}

/// Replaces the convolutions and products the matrix path runs faster. A
/// weight `keep_with_tract` names (a stand-in for weights tract packed on an
/// earlier start) leaves its op with tract.
pub fn route(
    model: &mut TypedModel,
    path: MatrixPath,
    keep_with_tract: impl Fn(&Arc<Tensor>) -> bool,
) -> TractResult<Routed> {
    // Every size, and shifted taps wherever they apply, so that small
    // fixtures exercise every layout.
    let every_size = Rule {
        min_macs: 0,
        min_weight_reuse: 0,
        im2col_max_pixels: 0,
        ..RULE
    };
    match path {
        MatrixPath::Tract => Ok(Routed::default()),
        MatrixPath::Gemm => route_with(model, keep_with_tract, &RULE),
        MatrixPath::GemmAll => route_with(model, keep_with_tract, &every_size),
    }
}

fn route_with(
    model: &mut TypedModel,
    keep_with_tract: impl Fn(&Arc<Tensor>) -> bool,
    rule: &Rule,
) -> TractResult<Routed> {
    let mut routed = Routed::default();
    for id in model.eval_order()? {
        let node = model.node(id);
        let replacement: Option<(Box<dyn TypedOp>, &'static str)> =
            if let Some(op) = node.op_as::<Conv>() {
                conv_for(model, node, op, &keep_with_tract, rule)?.map(|c| {
                    let kind = c.layout.name();
                    (Box::new(c) as Box<dyn TypedOp>, kind)
                })
            } else if let Some(op) = node.op_as::<EinSum>() {
                product_for(model, node, op, &keep_with_tract, rule)?
                    .map(|p| (Box::new(p) as Box<dyn TypedOp>, "gemm product"))
            } else {
                None
            };
        if let Some((op, kind)) = replacement {
            let inputs = node.inputs.clone();
            let patch = TypedModelPatch::replace_single_op(model, model.node(id), &inputs, op)?;
            patch.apply(model)?;
            *routed.0.entry(kind).or_default() += 1;
        }
    }
    Ok(routed)
}

fn concrete_f32(fact: &TypedFact) -> Option<Vec<usize>> {
    (fact.datum_type == f32::datum_type() && !fact.is_exotic()).then_some(())?;
    fact.shape.as_concrete().map(|s| s.to_vec())
}

fn keeps_weight(fact: &TypedFact, keep_with_tract: &impl Fn(&Arc<Tensor>) -> bool) -> bool {
    fact.konst
        .as_ref()
        .is_some_and(|k| !k.is_plain() || keep_with_tract(k))
}

fn conv_for(
    model: &TypedModel,
    node: &TypedNode,
    op: &Conv,
    keep_with_tract: &impl Fn(&Arc<Tensor>) -> bool,
    rule: &Rule,
) -> TractResult<Option<GemmConv>> {
    let spec = &op.pool_spec;
    if op.q_params.is_some()
        || op.group != 1
        || op.kernel_fmt != KernelFormat::OIHW
        || spec.rank() != 2
    {
        return Ok(None);
    }
    if !matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW) || node.inputs.len() != 3 {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let (Some(input), Some(kernel), Some(_)) = (
        concrete_f32(facts[0]),
        concrete_f32(facts[1]),
        concrete_f32(facts[2]),
    ) else {
        return Ok(None);
    };
    if keeps_weight(facts[1], keep_with_tract) || keeps_weight(facts[2], keep_with_tract) {
        return Ok(None);
    }
    let Some(output) = concrete_f32(model.outlet_fact(node.id.into())?) else {
        return Ok(None);
    };
    let shape = spec.data_format.shape(&input)?;
    let hw = shape.hw_dims().to_vec();
    let padding = spec.computed_padding(&hw);
    let geometry = Geometry {
        batch: shape.n().copied().unwrap_or(1),
        cin: *shape.c(),
        cout: kernel[0],
        input: [hw[0], hw[1]],
        kernel: [kernel[2], kernel[3]],
        stride: [spec.stride(0), spec.stride(1)],
        dilation: [spec.dilation(0), spec.dilation(1)],
        pad_before: [padding[0].pad_before, padding[1].pad_before],
        pad_after: [padding[0].pad_after, padding[1].pad_after],
    };
    let agrees = kernel[1] == geometry.cin
        && padding[0].convoluted == geometry.output(0)
        && padding[1].convoluted == geometry.output(1)
        && output.iter().product::<usize>()
            == geometry.batch * geometry.cout * geometry.output(0) * geometry.output(1);
    if !agrees || geometry.macs() < rule.min_macs {
        return Ok(None);
    }
    let layout = if geometry.kernel == [1, 1]
        && geometry.stride == [1, 1]
        && geometry.pad_before == [0, 0]
        && geometry.pad_after == [0, 0]
    {
        Layout::Pointwise
    } else if geometry.stride == [1, 1]
        && geometry.cin >= rule.min_tap_depth
        && !im2col_fits(&geometry, rule)
    {
        Layout::ShiftedTaps
    } else {
        Layout::Im2col
    };
    GemmConv::new(geometry, layout, output.into()).map(Some)
}

fn im2col_fits(g: &Geometry, rule: &Rule) -> bool {
    let pixels = g.output(0) * g.output(1);
    let bytes = g.cin * g.kernel[0] * g.kernel[1] * pixels * std::mem::size_of::<f32>();
    pixels <= rule.im2col_max_pixels
        && g.cin >= rule.im2col_min_cin
        && bytes <= rule.im2col_max_bytes
}

fn product_for(
    model: &TypedModel,
    node: &TypedNode,
    op: &EinSum,
    keep_with_tract: &impl Fn(&Arc<Tensor>) -> bool,
    rule: &Rule,
) -> TractResult<Option<GemmProduct>> {
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let (Some(lhs), Some(rhs)) = (concrete_f32(facts[0]), concrete_f32(facts[1])) else {
        return Ok(None);
    };
    if facts.iter().any(|f| keeps_weight(f, keep_with_tract)) {
        return Ok(None);
    }
    let Some(output) = concrete_f32(model.outlet_fact(node.id.into())?) else {
        return Ok(None);
    };
    let Some(product) = GemmProduct::from_einsum(op, [&lhs, &rhs], &output) else {
        return Ok(None);
    };
    let dims = product.dims;
    let wide_enough = dims.m.min(dims.n) >= 16 && dims.k >= 16;
    let weight_len = facts
        .iter()
        .filter_map(|f| f.konst.as_ref().map(|k| k.len()))
        .max();
    let reused = weight_len.is_none_or(|len| product.macs() / len.max(1) >= rule.min_weight_reuse);
    Ok((wide_enough && reused && product.macs() >= rule.min_macs).then_some(product))
}
