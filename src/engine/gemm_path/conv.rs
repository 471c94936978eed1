//! Float convolutions as products from the `gemm` crate.
//!
//! Three layouts, chosen per shape when the graph is routed (`mod.rs`):
//! - `Pointwise`: a 1×1 convolution is one product, weights × input.
//! - `ShiftedTaps`: a stride-1 convolution with no im2col at all. The input
//!   is padded once; each kernel tap (ky, kx) is then a product of that tap's
//!   weights with the padded input shifted by ky rows and kx columns, read in
//!   place. The output is computed on the padded width, so every tap's operand
//!   is one strided matrix; the border columns are dropped when the result is
//!   copied out.
//! - `Im2col`: the columns matrix is built and multiplied once (any stride).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::call::{self, Dims, Into, View};
use super::scratch::Scratch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    Pointwise,
    ShiftedTaps,
    Im2col,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Pointwise => "gemm 1x1",
            Layout::ShiftedTaps => "gemm shifted taps",
            Layout::Im2col => "gemm im2col",
        }
    }
}

/// A 2-D convolution's sizes, fixed for one plan: `[batch, cin, h, w]` in,
/// `[batch, cout, ho, wo]` out, an OIHW kernel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub input: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// Zero rows and columns before the input (top, left) and after it.
    pub pad_before: [usize; 2],
    pub pad_after: [usize; 2],
}

impl Geometry {
    fn padded(&self, axis: usize) -> usize {
        self.input[axis] + self.pad_before[axis] + self.pad_after[axis]
    }

    pub fn output(&self, axis: usize) -> usize {
        let reach = self.dilation[axis] * (self.kernel[axis] - 1) + 1;
        (self.padded(axis) - reach) / self.stride[axis] + 1
    }

    fn taps(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }

    pub fn macs(&self) -> usize {
        self.batch * self.cout * self.cin * self.taps() * self.output(0) * self.output(1)
    }

    fn is_unpadded_pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.pad_before == [0, 0]
            && self.pad_after == [0, 0]
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GemmConv {
    pub geometry: Geometry,
    pub layout: Layout,
    /// Output shape as the replaced op declared it (with or without the batch axis).
    pub output_shape: TVec<usize>,
}

impl GemmConv {
    pub fn new(
        geometry: Geometry,
        layout: Layout,
        output_shape: TVec<usize>,
    ) -> TractResult<GemmConv> {
        ensure!(
            layout != Layout::Pointwise || geometry.is_unpadded_pointwise(),
            "a pointwise product needs a 1x1, stride-1, unpadded convolution"
        );
        ensure!(
            layout != Layout::ShiftedTaps || geometry.stride == [1, 1],
            "shifted taps need stride 1"
        );
        Ok(GemmConv {
            geometry,
            layout,
            output_shape,
        })
    }

    fn run(
        &self,
        input: &[f32],
        kernel: &[f32],
        bias: &[f32],
        output: &mut [f32],
    ) -> TractResult<()> {
        let g = &self.geometry;
        let (in_len, out_len) = (
            g.cin * g.input[0] * g.input[1],
            g.cout * g.output(0) * g.output(1),
        );
        ensure!(input.len() == g.batch * in_len && output.len() == g.batch * out_len);
        ensure!(kernel.len() == g.cout * g.cin * g.taps());
        for b in 0..g.batch {
            let image = &input[b * in_len..][..in_len];
            let out = &mut output[b * out_len..][..out_len];
            match self.layout {
                Layout::Pointwise => self.pointwise(image, kernel, out)?,
                Layout::ShiftedTaps => self.shifted_taps(image, kernel, bias, out)?,
                Layout::Im2col => self.im2col(image, kernel, out)?,
            }
            if self.layout != Layout::ShiftedTaps {
                add_bias(out, bias, g.cout);
            }
        }
        Ok(())
    }

    fn pointwise(&self, image: &[f32], kernel: &[f32], out: &mut [f32]) -> TractResult<()> {
        let g = &self.geometry;
        let pixels = g.input[0] * g.input[1];
        let dims = Dims {
            m: g.cout,
            n: pixels,
            k: g.cin,
        };
        call::multiply(
            dims,
            (out, View::rows(0, pixels)),
            (kernel, View::rows(0, g.cin)),
            (image, View::rows(0, pixels)),
            Into::Overwrite,
        )
    }

    fn shifted_taps(
        &self,
        image: &[f32],
        kernel: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) -> TractResult<()> {
        let g = &self.geometry;
        let (hp, wp) = (g.padded(0), g.padded(1));
        let (ho, wo) = (g.output(0), g.output(1));
        // Shifted reads of the last channel run kw - 1 dilated columns past it.
        let tail = g.dilation[1] * (g.kernel[1] - 1);
        let mut padded = Scratch::take(g.cin * hp * wp + tail);
        pad_into(g, image, padded.as_mut_slice());
        let mut wide = Scratch::take(g.cout * ho * wp);
        let dims = Dims {
            m: g.cout,
            n: ho * wp,
            k: g.cin,
        };
        let lhs = View {
            offset: 0,
            row_stride: g.cin * g.taps(),
            col_stride: g.taps(),
        };
        for ky in 0..g.kernel[0] {
            for kx in 0..g.kernel[1] {
                let tap = ky * g.kernel[1] + kx;
                let shift = ky * g.dilation[0] * wp + kx * g.dilation[1];
                let into = if tap == 0 {
                    Into::Overwrite
                } else {
                    Into::Accumulate
                };
                call::multiply(
                    dims,
                    (wide.as_mut_slice(), View::rows(0, ho * wp)),
                    (kernel, lhs.at(tap)),
                    (padded.as_slice(), View::rows(shift, hp * wp)),
                    into,
                )?;
            }
        }
        drop(padded);
        // Each output plane is its wide plane without the border columns, plus the bias.
        let wide = wide.as_slice();
        call::for_each_chunk(out, ho * wo, |c, plane| {
            let b = channel_bias(bias, c);
            let rows = wide[c * ho * wp..][..ho * wp].chunks_exact(wp);
            for (out_row, wide_row) in plane.chunks_exact_mut(wo).zip(rows) {
                out_row
                    .iter_mut()
                    .zip(wide_row)
                    .for_each(|(o, w)| *o = w + b);
            }
        });
        Ok(())
    }

    fn im2col(&self, image: &[f32], kernel: &[f32], out: &mut [f32]) -> TractResult<()> {
        let g = &self.geometry;
        let pixels = g.output(0) * g.output(1);
        let depth = g.cin * g.taps();
        let mut columns = Scratch::take(depth * pixels);
        fill_columns(g, image, columns.as_mut_slice());
        let dims = Dims {
            m: g.cout,
            n: pixels,
            k: depth,
        };
        call::multiply(
            dims,
            (out, View::rows(0, pixels)),
            (kernel, View::rows(0, depth)),
            (columns.as_slice(), View::rows(0, pixels)),
            Into::Overwrite,
        )
    }
}

/// Writes every element of `padded`: the image framed by zeros, channel by
/// channel, then a zero tail.
fn pad_into(g: &Geometry, image: &[f32], padded: &mut [f32]) {
    let (h, w) = (g.input[0], g.input[1]);
    let (hp, wp) = (g.padded(0), g.padded(1));
    let (top, left) = (g.pad_before[0], g.pad_before[1]);
    let (channels, tail) = padded.split_at_mut(g.cin * hp * wp);
    tail.fill(0.0);
    call::for_each_chunk(channels, hp * wp, |c, plane| {
        let source = &image[c * h * w..][..h * w];
        let (above, rest) = plane.split_at_mut(top * wp);
        above.fill(0.0);
        let (rows, below) = rest.split_at_mut(h * wp);
        below.fill(0.0);
        for (row, source_row) in rows.chunks_exact_mut(wp).zip(source.chunks_exact(w)) {
            row[..left].fill(0.0);
            row[left..left + w].copy_from_slice(source_row);
            row[left + w..].fill(0.0);
        }
    });
}

/// The im2col matrix: row (c, ky, kx), column (y, x) holds the input pixel
/// that tap reads for that output pixel, or zero in the padding.
fn fill_columns(g: &Geometry, image: &[f32], columns: &mut [f32]) {
    let (h, w) = (g.input[0] as isize, g.input[1] as isize);
    let (ho, wo) = (g.output(0), g.output(1));
    call::for_each_chunk(columns, ho * wo, |r, row| {
        let (c, tap) = (r / g.taps(), r % g.taps());
        let (ky, kx) = (tap / g.kernel[1], tap % g.kernel[1]);
        let plane = &image[c * (h * w) as usize..][..(h * w) as usize];
        for y in 0..ho {
            let sy = (y * g.stride[0] + ky * g.dilation[0]) as isize - g.pad_before[0] as isize;
            let dst = &mut row[y * wo..][..wo];
            if sy < 0 || sy >= h {
                dst.fill(0.0);
                continue;
            }
            let source = &plane[(sy * w) as usize..][..w as usize];
            for (x, value) in dst.iter_mut().enumerate() {
                let sx = (x * g.stride[1] + kx * g.dilation[1]) as isize - g.pad_before[1] as isize;
                *value = if sx < 0 || sx >= w {
                    0.0
                } else {
                    source[sx as usize]
                };
            }
        }
    });
}

/// The bias of channel `c`: one per channel, one for all, or none.
fn channel_bias(bias: &[f32], c: usize) -> f32 {
    match bias.len() {
        0 => 0.0,
        1 => bias[0],
        _ => bias[c],
    }
}

fn add_bias(out: &mut [f32], bias: &[f32], channels: usize) {
    if bias.iter().all(|&b| b == 0.0) {
        return;
    }
    call::for_each_chunk(out, out.len() / channels, |c, plane| {
        let b = channel_bias(bias, c);
        plane.iter_mut().for_each(|v| *v += b);
    });
}

impl Op for GemmConv {
    fn name(&self) -> StaticName {
        "GemmConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} {:?}", self.layout.name(), self.geometry)])
    }

    op_as_typed_op!();
}

impl EvalOp for GemmConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 3, "GemmConv takes input, kernel and bias");
        let [input, kernel, bias] =
            [&inputs[0], &inputs[1], &inputs[2]].map(|t| t.try_as_plain_ram());
        let (input, kernel, bias) = (input?, kernel?, bias?);
        // SAFETY: every element is written below (each layout overwrites the
        // whole output before the bias is added).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            self.run(
                input.as_slice::<f32>()?,
                kernel.as_slice::<f32>()?,
                bias.as_slice::<f32>()?,
                view.as_slice_mut::<f32>()?,
            )?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for GemmConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3 && inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        Ok(tvec!(f32::fact(&self.output_shape)))
    }

    as_op!();
}
