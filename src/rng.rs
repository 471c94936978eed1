//! Seeded Gaussian noise bit-compatible with PyTorch's CPU generator.
//!
//! A request's seed must reproduce what diffusers draws with
//! `torch.Generator("cpu").manual_seed(seed)`, so this module follows
//! PyTorch's CPU sampling code rather than any textbook sampler:
//!
//! * the engine is MT19937 seeded with the low 32 bits of the seed
//!   (`at::mt19937` keeps only `seed & 0xffffffff` for its state);
//! * `torch.randn` on a contiguous float32 tensor of at least 16 elements
//!   (`normal_fill` in `aten/src/ATen/native/cpu/DistributionTemplates.h`)
//!   first fills the whole buffer with float uniforms built from the low 24
//!   bits of one 32-bit draw each, then applies Box–Muller to blocks of 16
//!   (element `i` paired with `i + 8`); when the length is not a multiple of
//!   16, the last 16 elements are refilled with fresh uniforms and
//!   transformed again;
//! * smaller tensors take the scalar path (`at::normal_distribution<double>`):
//!   double uniforms from 53 bits of two 32-bit draws, Box–Muller in double,
//!   and the second value of each pair cached in the generator for the next
//!   scalar draw, across calls.
//!
//! The block path's log/sin/cos differ between PyTorch builds: x86-64 builds
//! (AVX2 and AVX-512 kernels) use the Cephes polynomials of `avx_mathfun.h`,
//! compiled with fused multiply-adds; other CPUs (aarch64 boards, x86
//! without AVX2) call libm. The two disagree by up to a few float32 ulps
//! (≈2e-6). [`NormalKernel`] reproduces either bit for bit, and
//! [`TorchGenerator::new`] picks the one PyTorch uses on the CPU it runs on.

use ndarray::{ArrayD, IxDyn};

/// Number of 32-bit words in the MT19937 state.
const STATE_LEN: usize = 624;
/// Offset of the twisted partner word.
const SHIFT: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// Tensors with fewer elements than this take PyTorch's scalar path.
const BLOCK: usize = 16;
const HALF_BLOCK: usize = BLOCK / 2;

/// The Mersenne Twister exactly as `at::mt19937` runs it.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; STATE_LEN],
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        // PyTorch stores the 64-bit seed but initialises the state from its
        // low 32 bits only.
        let mut state = [0u32; STATE_LEN];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..STATE_LEN {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            next: STATE_LEN,
        }
    }

    fn twist(&mut self) {
        for i in 0..STATE_LEN {
            let y = (self.state[i] & UPPER_MASK) | (self.state[(i + 1) % STATE_LEN] & LOWER_MASK);
            let mut value = self.state[(i + SHIFT) % STATE_LEN] ^ (y >> 1);
            if y & 1 != 0 {
                value ^= MATRIX_A;
            }
            self.state[i] = value;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= STATE_LEN {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// Which of PyTorch's CPU kernels for the ≥ 16-element normal fill to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormalKernel {
    /// `normal_fill_16_AVX2`: Cephes polynomials, as in x86-64 builds on CPUs
    /// with AVX2.
    Avx2,
    /// `normal_fill_16`: libm `logf`/`cosf`/`sinf`, as on aarch64.
    Portable,
}

impl NormalKernel {
    /// The kernel PyTorch dispatches to on this architecture (x86-64 CPUs
    /// without AVX2, rare today, would get `Portable` from PyTorch).
    pub fn native() -> Self {
        if cfg!(target_arch = "x86_64") {
            NormalKernel::Avx2
        } else {
            NormalKernel::Portable
        }
    }
}

/// A CPU generator that yields the same normal samples as
/// `torch.Generator("cpu").manual_seed(seed)` with `torch.randn(..., dtype=float32)`.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    kernel: NormalKernel,
    /// Second Box–Muller value of the scalar path, kept for the next scalar draw
    /// (`CPUGeneratorImpl::next_double_normal_sample_`).
    cached_normal: Option<f64>,
}

impl TorchGenerator {
    /// Same state as `torch.Generator("cpu").manual_seed(seed)`, with the
    /// normal kernel PyTorch uses on this architecture.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::native())
    }

    /// Like [`TorchGenerator::new`], following the given PyTorch kernel, e.g.
    /// to reproduce on a board the noise an x86 workstation draws.
    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        Self {
            engine: Mt19937::new(seed),
            kernel,
            cached_normal: None,
        }
    }

    /// `torch.randn(shape, generator=self, dtype=torch.float32)`, advancing the
    /// generator exactly as PyTorch does so successive calls stay in step.
    pub fn randn(&mut self, shape: &[usize]) -> ArrayD<f32> {
        let len: usize = shape.iter().product();
        let values = if len >= BLOCK {
            self.normal_blocks(len)
        } else {
            (0..len).map(|_| self.scalar_normal() as f32).collect()
        };
        ArrayD::from_shape_vec(IxDyn(shape), values)
            .expect("element count is the product of the shape")
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: 24 random bits of one draw.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: 53 random bits of a
    /// 64-bit value whose high half is the first draw.
    fn uniform_f64(&mut self) -> f64 {
        let high = u64::from(self.engine.next_u32());
        let low = u64::from(self.engine.next_u32());
        let bits = (high << 32) | low;
        (bits & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)` with the generator's cache.
    fn scalar_normal(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// The vectorised `normal_fill` path for `len >= 16`.
    fn normal_blocks(&mut self, len: usize) -> Vec<f32> {
        let transform = match self.kernel {
            NormalKernel::Avx2 => box_muller_block_avx2,
            NormalKernel::Portable => box_muller_block_portable,
        };
        let mut data: Vec<f32> = (0..len).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(BLOCK) {
            transform(block);
        }
        if len % BLOCK != 0 {
            let tail = &mut data[len - BLOCK..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            transform(tail);
        }
        data
    }
}

/// `normal_fill_16`: turns 16 uniforms into 16 normals in place, pairing
/// element `j` (radius) with element `j + 8` (angle). The angle is formed in
/// double precision and rounded, as the C++ expression does.
fn box_muller_block_portable(block: &mut [f32]) {
    for j in 0..HALF_BLOCK {
        let u1 = 1.0 - block[j];
        let u2 = block[j + HALF_BLOCK];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * f64::from(u2)) as f32;
        block[j] = radius * theta.cos();
        block[j + HALF_BLOCK] = radius * theta.sin();
    }
}

/// `normal_fill_16_AVX2`: as [`box_muller_block_portable`] with float32
/// angle arithmetic and the Cephes functions.
fn box_muller_block_avx2(block: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..HALF_BLOCK {
        let u1 = 1.0 - block[j];
        let u2 = block[j + HALF_BLOCK];
        let radius = (-2.0 * cephes_logf(u1)).sqrt();
        let (sin, cos) = cephes_sincosf(two_pi * u2);
        block[j] = radius * cos;
        block[j + HALF_BLOCK] = radius * sin;
    }
}

/// `log256_ps` from PyTorch's `avx_mathfun.h`, one lane. The argument is in
/// (0, 1] here, so the special cases for non-positive input never apply.
/// `mul_add` marks where GCC fuses a multiply with the following add when
/// building PyTorch's AVX2 kernels; without them results drift by an ulp.
#[allow(clippy::excessive_precision)] // literals copied digit for digit
fn cephes_logf(x: f32) -> f32 {
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2; // cephes_SQRTHF
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4;
    const Q2: f32 = 0.693_359_375;

    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    let mut mantissa = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let below = mantissa < SQRTHF;
    let tmp = if below { mantissa } else { 0.0 };
    mantissa -= 1.0;
    if below {
        e -= 1.0;
    }
    mantissa += tmp;
    let x = mantissa;
    let z = x * x;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    e.mul_add(Q2, x + y)
}

/// `sincos256_ps` from PyTorch's `avx_mathfun.h`, one lane.
#[allow(clippy::excessive_precision)] // literals copied digit for digit
fn cephes_sincosf(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.27323954473516; // 4 / pi
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8;
    const SIN_P: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    const COS_P: [f32; 3] = [
        2.443315711809948E-5,
        -1.388731625493765E-3,
        4.166664568298827E-2,
    ];

    let sign_sin_in = x.to_bits() & 0x8000_0000;
    let ax = x.abs();
    let mut j = (ax * FOPI) as i32; // truncation, like cvttps
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let use_sin_poly = (j & 2) == 0;
    let mut r = ax;
    r = y.mul_add(DP1, r);
    r = y.mul_add(DP2, r);
    r = y.mul_add(DP3, r);

    let cos_swap = (((!(j - 2)) & 4) as u32) << 29;
    let sign_sin = sign_sin_in ^ swap_sin;

    let z = r * r;
    let mut poly_cos = COS_P[0];
    poly_cos = poly_cos.mul_add(z, COS_P[1]);
    poly_cos = poly_cos.mul_add(z, COS_P[2]);
    poly_cos *= z;
    poly_cos = poly_cos.mul_add(z, -(z * 0.5));
    poly_cos += 1.0;

    let mut poly_sin = SIN_P[0];
    poly_sin = poly_sin.mul_add(z, SIN_P[1]);
    poly_sin = poly_sin.mul_add(z, SIN_P[2]);
    poly_sin *= z;
    poly_sin = poly_sin.mul_add(r, r);

    let (sin, cos) = if use_sin_poly {
        (poly_sin, poly_cos)
    } else {
        (poly_cos, poly_sin)
    };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ cos_swap),
    )
}
