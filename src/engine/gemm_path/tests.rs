//! Each routed op against tract's own evaluation of the op it replaces.
//!
//! Tolerance: the two sum the same products in another order (tract's
//! kernels and `gemm`'s block k differently), so outputs differ by float32
//! rounding that grows with the depth of the sum: 1e-5 of the sum of the
//! terms' magnitudes bounds it for depths up to a few thousand.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::conv::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::{route_with, Rule};

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

fn tensor(shape: &[usize], seed: usize) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_shape(shape, &values(len, seed)).unwrap()
}

const EVERYTHING: Rule = Rule {
    min_macs: 0,
    min_tap_depth: 32,
    min_weight_reuse: 0,
    im2col_max_pixels: 0,
    im2col_min_cin: 0,
    im2col_max_bytes: 0,
};

/// Runs `model` as tract optimizes it and as routed; returns the routed
/// kinds and asserts the outputs agree.
fn compare(model: TypedModel, inputs: TVec<Tensor>, depth: usize) -> Vec<&'static str> {
    let reference = model
        .clone()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let expected = reference
        .run(inputs.iter().cloned().map(|t| t.into_tvalue()).collect())
        .unwrap();
    let mut routed_model = model;
    let routed = route_with(&mut routed_model, |_| false, &EVERYTHING).unwrap();
    let plan = routed_model
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let got = plan
        .run(inputs.into_iter().map(|t| t.into_tvalue()).collect())
        .unwrap();
    let (e, g) = (
        expected[0].to_plain_array_view::<f32>().unwrap(),
        got[0].to_plain_array_view::<f32>().unwrap(),
    );
    assert_eq!(e.shape(), g.shape());
    let bound = 1e-5 * depth as f32;
    for (a, b) in e.iter().zip(g.iter()) {
        assert!((a - b).abs() <= bound * (1.0 + a.abs()), "{a} vs {b}");
    }
    routed.0.into_keys().collect()
}

struct ConvCase {
    input: [usize; 4],
    cout: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    pad: ([usize; 2], [usize; 2]),
}

impl ConvCase {
    /// A 3×3, stride-1 convolution padded to keep its size.
    fn same_3x3(input: [usize; 4], cout: usize) -> ConvCase {
        ConvCase {
            input,
            cout,
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
            pad: ([1, 1], [1, 1]),
        }
    }
}

fn conv_model(case: &ConvCase) -> TypedModel {
    let cin = case.input[1];
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact(case.input)).unwrap();
    let kernel = model
        .add_const(
            "k",
            tensor(&[case.cout, cin, case.kernel[0], case.kernel[1]], 1),
        )
        .unwrap();
    let bias = model.add_const("b", tensor(&[case.cout], 2)).unwrap();
    let pool = PoolSpec {
        data_format: DataFormat::NCHW,
        kernel_shape: case.kernel.iter().copied().collect(),
        padding: PaddingSpec::Explicit(
            case.pad.0.iter().copied().collect(),
            case.pad.1.iter().copied().collect(),
        ),
        dilations: Some(case.dilation.iter().copied().collect()),
        strides: Some(case.stride.iter().copied().collect()),
        input_channels: cin,
        output_channels: case.cout,
    };
    let conv = Conv::new(pool, KernelFormat::OIHW, 1, None);
    let y = model.wire_node("conv", conv, &[x, kernel, bias]).unwrap();
    model.select_output_outlets(&y).unwrap();
    model
}

fn check_conv(case: ConvCase, layout: &str) {
    let depth = case.input[1] * case.kernel[0] * case.kernel[1];
    let model = conv_model(&case);
    let routed = compare(model, tvec!(tensor(&case.input, 3)), depth);
    assert_eq!(routed, vec![layout]);
}

#[test]
fn shifted_taps_match_tract_with_padding_batch_and_dilation() {
    let case = |input, pad, dilation| ConvCase {
        input,
        cout: 24,
        kernel: [3, 3],
        stride: [1, 1],
        dilation,
        pad,
    };
    check_conv(
        case([1, 32, 9, 11], ([1, 1], [1, 1]), [1, 1]),
        "gemm shifted taps",
    );
    check_conv(
        case([2, 40, 8, 8], ([0, 2], [1, 0]), [1, 1]),
        "gemm shifted taps",
    );
    check_conv(
        case([1, 33, 12, 10], ([2, 2], [2, 2]), [2, 2]),
        "gemm shifted taps",
    );
    check_conv(
        case([1, 32, 7, 7], ([0, 0], [0, 0]), [1, 1]),
        "gemm shifted taps",
    );
}

#[test]
fn memory_passes_on_two_threads_match_tract() {
    super::set_threads(2);
    let case = ConvCase::same_3x3([1, 32, 48, 50], 16);
    check_conv(case, "gemm shifted taps");
    let strided = ConvCase {
        stride: [2, 2],
        ..ConvCase::same_3x3([1, 16, 96, 96], 8)
    };
    check_conv(strided, "gemm im2col");
}

#[test]
fn a_weight_used_by_few_rows_stays_with_tract() {
    let op = EinSum::new("mk,kn->mn".parse().unwrap(), f32::datum_type());
    let mut model = TypedModel::default();
    let a = model.add_source("a", f32::fact([77, 64])).unwrap();
    let w = model.add_const("w", tensor(&[64, 48], 1)).unwrap();
    let y = model.wire_node("product", op, &[a, w]).unwrap();
    model.select_output_outlets(&y).unwrap();
    let rule = Rule {
        min_weight_reuse: 256,
        ..EVERYTHING
    };
    assert_eq!(
        route_with(&mut model.clone(), |_| false, &rule)
            .unwrap()
            .total(),
        0
    );
    assert_eq!(
        route_with(&mut model, |_| false, &EVERYTHING)
            .unwrap()
            .total(),
        1
    );
}

#[test]
fn pointwise_and_im2col_match_tract() {
    let pointwise = ConvCase {
        input: [2, 48, 6, 5],
        cout: 20,
        kernel: [1, 1],
        stride: [1, 1],
        dilation: [1, 1],
        pad: ([0, 0], [0, 0]),
    };
    check_conv(pointwise, "gemm 1x1");
    let strided = ConvCase {
        stride: [2, 2],
        ..ConvCase::same_3x3([1, 16, 11, 9], 12)
    };
    check_conv(strided, "gemm im2col");
    let shallow = ConvCase::same_3x3([1, 4, 10, 10], 32);
    check_conv(shallow, "gemm im2col");
}

fn check_product(expr: &str, shapes: [&[usize]; 2], weight: bool) {
    let op = EinSum::new(expr.parse().unwrap(), f32::datum_type());
    let mut model = TypedModel::default();
    let a = model.add_source("a", f32::fact(shapes[0])).unwrap();
    let (b, inputs) = if weight {
        (
            model.add_const("w", tensor(shapes[1], 5)).unwrap(),
            tvec!(tensor(shapes[0], 4)),
        )
    } else {
        let b = model.add_source("b", f32::fact(shapes[1])).unwrap();
        (b, tvec!(tensor(shapes[0], 4), tensor(shapes[1], 5)))
    };
    let y = model.wire_node("product", op, &[a, b]).unwrap();
    model.select_output_outlets(&y).unwrap();
    let routed = compare(model, inputs, 64);
    assert_eq!(routed, vec!["gemm product"], "{expr}");
}

#[test]
fn products_match_tract_for_linear_layers_and_attention() {
    check_product("mk,kn->mn", [&[40, 33], &[33, 27]], false);
    check_product("bmk,kn->bmn", [&[2, 40, 32], &[32, 24]], true);
    check_product("bsk,nk->bsn", [&[1, 50, 32], &[48, 32]], true);
    check_product("bhqd,bhkd->bhqk", [&[1, 3, 40, 16], &[1, 3, 36, 16]], false);
    check_product("bhqk,bhkd->bhqd", [&[2, 2, 40, 36], &[2, 2, 36, 16]], false);
    check_product("bqd,bkd->bkq", [&[3, 20, 17], &[3, 19, 17]], false);
}

#[test]
fn a_product_with_a_diagonal_or_a_one_sided_sum_stays_with_tract() {
    let op = EinSum::new("mkj,kn->mn".parse().unwrap(), f32::datum_type());
    let mut model = TypedModel::default();
    let a = model.add_source("a", f32::fact([40, 33, 2])).unwrap();
    let w = model.add_const("w", tensor(&[33, 27], 1)).unwrap();
    let y = model.wire_node("product", op, &[a, w]).unwrap();
    model.select_output_outlets(&y).unwrap();
    let routed = route_with(&mut model, |_| false, &EVERYTHING).unwrap();
    assert_eq!(routed.total(), 0);
}

#[test]
fn weights_kept_for_tract_stay_with_tract() {
    let case = ConvCase::same_3x3([1, 32, 8, 8], 16);
    let mut model = conv_model(&case);
    let routed = route_with(&mut model, |_| true, &EVERYTHING).unwrap();
    assert_eq!(routed.total(), 0);
}

#[test]
fn few_pixels_take_im2col_and_many_take_shifted_taps() {
    let layout = |input: [usize; 4]| {
        let case = ConvCase::same_3x3(input, 64);
        let mut model = conv_model(&case);
        let rule = Rule {
            min_macs: 0,
            ..super::RULE
        };
        route_with(&mut model, |_| false, &rule)
            .unwrap()
            .0
            .into_keys()
            .collect::<Vec<_>>()
    };
    assert_eq!(layout([1, 128, 16, 16]), vec!["gemm im2col"]);
    assert_eq!(layout([1, 64, 16, 16]), vec!["gemm shifted taps"]);
    assert_eq!(layout([1, 128, 80, 80]), vec!["gemm shifted taps"]);
}
