//! Float matrix products (tract's `EinSum` of two operands) on the `gemm` crate.
//!
//! Every axis of an einsum plays one role: summed (in both operands, not in
//! the output), a row of the left operand, a column of the right one, or a
//! batch axis in all three. The largest row axis becomes the product's m, the
//! largest column axis its n and the one summed axis its k; every other axis
//! is a loop around the product, with a zero stride for an operand that lacks
//! it (a weight shared by every row, say). All of it is fixed per plan, since
//! a plan's shapes are concrete.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::call::{self, Dims, Into, View};

/// One axis looped around the product: its extent and its stride in the
/// left operand, the right operand and the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Loop {
    extent: usize,
    strides: [usize; 3],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GemmProduct {
    pub dims: Dims,
    views: [View; 3],
    loops: Vec<Loop>,
    input_lens: [usize; 2],
    output_shape: TVec<usize>,
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl GemmProduct {
    /// The product an einsum of two concrete f32 operands amounts to, or
    /// `None` when some axis fits no role (a diagonal, an axis summed in one
    /// operand only, two summed axes).
    pub fn from_einsum(
        op: &EinSum,
        shapes: [&[usize]; 2],
        output: &[usize],
    ) -> Option<GemmProduct> {
        let shapes = [shapes[0], shapes[1], output];
        let all_strides = shapes.map(strides);
        // (extent, position in each of lhs, rhs, output)
        let mut axes: Vec<(usize, [Option<usize>; 3])> = vec![];
        for axis in op.axes.iter_all_axes() {
            let places = [&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]];
            if places.iter().any(|p| p.len() > 1) {
                return None;
            }
            let position = places.map(|p| p.first().copied());
            let extents: Vec<usize> = (0..3)
                .filter_map(|i| position[i].map(|p| shapes[i][p]))
                .collect();
            let extent = *extents.iter().max()?;
            // Broadcasting is a zero stride; any other mismatch is not a product.
            if extents.iter().any(|&e| e != extent && e != 1) {
                return None;
            }
            axes.push((extent, position));
        }
        let stride_in = |axis: &(usize, [Option<usize>; 3]), i: usize| match axis.1[i] {
            Some(p) if shapes[i][p] != 1 => all_strides[i][p],
            _ => 0,
        };
        let role = |a: &(usize, [Option<usize>; 3])| {
            (a.1[0].is_some(), a.1[1].is_some(), a.1[2].is_some())
        };
        let pick = |wanted: (bool, bool, bool)| {
            axes.iter()
                .enumerate()
                .filter(|(_, a)| role(a) == wanted && a.0 > 1)
                .max_by_key(|(_, a)| a.0)
                .map(|(i, _)| i)
        };
        let (m, n, k) = (
            pick((true, false, true)),
            pick((false, true, true)),
            pick((true, true, false)),
        );
        let mut loops = vec![];
        for (i, axis) in axes.iter().enumerate() {
            if Some(i) == m || Some(i) == n || Some(i) == k || axis.0 == 1 {
                continue;
            }
            // Summed in one operand only, or summed twice, or only in the output.
            if axis.1[2].is_none() || (axis.1[0].is_none() && axis.1[1].is_none()) {
                return None;
            }
            loops.push(Loop {
                extent: axis.0,
                strides: [0, 1, 2].map(|j| stride_in(axis, j)),
            });
        }
        let extent = |ix: Option<usize>| ix.map_or(1, |i| axes[i].0);
        let stride = |ix: Option<usize>, j: usize| ix.map_or(0, |i| stride_in(&axes[i], j));
        let dims = Dims {
            m: extent(m),
            n: extent(n),
            k: extent(k),
        };
        let views = [
            View {
                offset: 0,
                row_stride: stride(m, 0),
                col_stride: stride(k, 0),
            },
            View {
                offset: 0,
                row_stride: stride(k, 1),
                col_stride: stride(n, 1),
            },
            View {
                offset: 0,
                row_stride: stride(m, 2),
                col_stride: stride(n, 2),
            },
        ];
        Some(GemmProduct {
            dims,
            views,
            loops,
            input_lens: [shapes[0].iter().product(), shapes[1].iter().product()],
            output_shape: output.into(),
        })
    }

    pub fn macs(&self) -> usize {
        let loops: usize = self.loops.iter().map(|l| l.extent).product();
        loops * self.dims.m * self.dims.n * self.dims.k
    }

    fn run(&self, lhs: &[f32], rhs: &[f32], out: &mut [f32]) -> TractResult<()> {
        ensure!(lhs.len() == self.input_lens[0] && rhs.len() == self.input_lens[1]);
        let total: usize = self.loops.iter().map(|l| l.extent).product();
        let mut index = vec![0; self.loops.len()];
        for _ in 0..total {
            let offset = |j: usize| -> usize {
                self.loops
                    .iter()
                    .zip(&index)
                    .map(|(l, i)| l.strides[j] * i)
                    .sum()
            };
            let [l, r, o] = [0, 1, 2].map(|j| self.views[j].at(offset(j)));
            call::multiply(
                self.dims,
                (&mut *out, o),
                (lhs, l),
                (rhs, r),
                Into::Overwrite,
            )?;
            // Odometer over the loop axes, last fastest.
            for (i, l) in index.iter_mut().zip(&self.loops).rev() {
                *i += 1;
                if *i < l.extent {
                    break;
                }
                *i = 0;
            }
        }
        Ok(())
    }
}

impl Op for GemmProduct {
    fn name(&self) -> StaticName {
        "GemmProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let loops: Vec<usize> = self.loops.iter().map(|l| l.extent).collect();
        Ok(vec![format!("{:?} looped over {loops:?}", self.dims)])
    }

    op_as_typed_op!();
}

impl EvalOp for GemmProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "GemmProduct takes two operands");
        let (lhs, rhs) = (inputs[0].try_as_plain_ram()?, inputs[1].try_as_plain_ram()?);
        // SAFETY: the products overwrite every element of the output: each
        // output element belongs to exactly one (loop index, row, column).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        if self.dims.k == 0 {
            output
                .try_as_plain_ram_mut()?
                .as_slice_mut::<f32>()?
                .fill(0.0);
        } else {
            let mut view = output.try_as_plain_ram_mut()?;
            self.run(
                lhs.as_slice::<f32>()?,
                rhs.as_slice::<f32>()?,
                view.as_slice_mut::<f32>()?,
            )?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for GemmProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2 && inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        Ok(tvec!(f32::fact(&self.output_shape)))
    }

    as_op!();
}
