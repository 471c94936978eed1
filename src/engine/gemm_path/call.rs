//! One bounds-checked entry to the `gemm` crate's raw-pointer kernel.
//!
//! The crate takes every operand as a pointer and two strides. Here each
//! operand is a slice and a `View`, and the product refuses to run when a
//! view would reach past its slice, so the ops above stay free of `unsafe`.

use std::sync::atomic::{AtomicUsize, Ordering};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::ensure;

/// Threads the products use; set with the engine's thread count.
static THREADS: AtomicUsize = AtomicUsize::new(1);

pub fn set_threads(threads: usize) {
    THREADS.store(threads.max(1), Ordering::Relaxed);
}

pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// Runs `f` on each `chunk`-long piece of `data` with its index, on the
/// products' threads: the memory passes around the products (padding,
/// copying out, bias) are a quarter of a large convolution's time on one
/// thread.
pub fn for_each_chunk(data: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Send + Sync) {
    use rayon::prelude::*;
    if threads() == 1 || data.len() < (1 << 16) {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// A matrix inside a buffer: where it starts and how far apart its rows and
/// columns are. Strides are non-negative; a zero stride repeats a row or column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct View {
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows(offset: usize, row_stride: usize) -> View {
        View {
            offset,
            row_stride,
            col_stride: 1,
        }
    }

    pub fn at(self, offset: usize) -> View {
        View {
            offset: self.offset + offset,
            ..self
        }
    }

    /// One past the last element a rows × cols matrix in this view reads.
    fn end(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return self.offset;
        }
        self.offset + (rows - 1) * self.row_stride + (cols - 1) * self.col_stride + 1
    }
}

/// The shape of `dst (m×n) = lhs (m×k) · rhs (k×n)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// How the product meets what `dst` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Into {
    Overwrite,
    Accumulate,
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs`.
pub fn multiply(
    dims: Dims,
    dst: (&mut [f32], View),
    lhs: (&[f32], View),
    rhs: (&[f32], View),
    into: Into,
) -> TractResult<()> {
    let Dims { m, n, k } = dims;
    ensure!(
        dst.1.end(m, n) <= dst.0.len()
            && lhs.1.end(m, k) <= lhs.0.len()
            && rhs.1.end(k, n) <= rhs.0.len(),
        "matrix product {dims:?} reaches past its operands"
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    let parallelism = match threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    };
    let stride = |s: usize| s as isize;
    // SAFETY: every element the kernel reads or writes lies inside its slice
    // (checked above), the destination is borrowed mutably and does not alias
    // the inputs, and the strides are the views' own.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0.as_mut_ptr().add(dst.1.offset),
            stride(dst.1.col_stride),
            stride(dst.1.row_stride),
            into == Into::Accumulate,
            lhs.0.as_ptr().add(lhs.1.offset),
            stride(lhs.1.col_stride),
            stride(lhs.1.row_stride),
            rhs.0.as_ptr().add(rhs.1.offset),
            stride(rhs.1.col_stride),
            stride(rhs.1.row_stride),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(dims: Dims, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; dims.m * dims.n];
        for i in 0..dims.m {
            for j in 0..dims.n {
                c[i * dims.n + j] = (0..dims.k)
                    .map(|p| a[i * dims.k + p] * b[p * dims.n + j])
                    .sum();
            }
        }
        c
    }

    #[test]
    fn products_match_the_definition_overwritten_and_accumulated() {
        let dims = Dims {
            m: 37,
            n: 53,
            k: 29,
        };
        let a: Vec<f32> = (0..dims.m * dims.k)
            .map(|i| (i % 13) as f32 - 6.0)
            .collect();
        let b: Vec<f32> = (0..dims.k * dims.n).map(|i| (i % 7) as f32 * 0.5).collect();
        let expected = naive(dims, &a, &b);
        let mut c = vec![f32::NAN; dims.m * dims.n];
        let views = (View::rows(0, dims.k), View::rows(0, dims.n));
        multiply(
            dims,
            (&mut c, View::rows(0, dims.n)),
            (&a, views.0),
            (&b, views.1),
            Into::Overwrite,
        )
        .unwrap();
        assert_eq!(c, expected);
        multiply(
            dims,
            (&mut c, View::rows(0, dims.n)),
            (&a, views.0),
            (&b, views.1),
            Into::Accumulate,
        )
        .unwrap();
        let doubled: Vec<f32> = expected.iter().map(|v| v * 2.0).collect();
        assert_eq!(c, doubled);
    }

    #[test]
    fn a_view_past_its_buffer_is_refused() {
        let dims = Dims { m: 4, n: 4, k: 4 };
        let a = vec![1.0; 16];
        let mut c = vec![0.0; 16];
        let err = multiply(
            dims,
            (&mut c, View::rows(0, 4)),
            (&a, View::rows(1, 4)),
            (&a, View::rows(0, 4)),
            Into::Overwrite,
        );
        assert!(err.is_err());
    }
}
