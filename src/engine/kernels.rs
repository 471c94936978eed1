//! What tract's linear-algebra layer chose on this machine: the instruction
//! set it detected, the kernels it prefers for representative products, and
//! the kernels the optimized plans of this process actually call. Plain data
//! out, so `doctor` can report it without importing tract.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tract_linalg::isa::IsaSet;
use tract_linalg::mmm::Query;
use tract_linalg::routines::Func;
use tract_linalg::MmmDispatch;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;

use super::gemm_path::{GemmConv, GemmProduct};

/// The instruction set tract dispatches on, as it detected it.
#[derive(Clone, Debug)]
pub struct CpuReport {
    /// Architecture tract runs its kernels for (`aarch64`, `arm`, `x86_64`, …).
    pub arch: String,
    /// tract's one-word name for the rung of the ladder this CPU is on (`neon`, `fma`, …).
    pub level: String,
    /// Every feature tract found, architecture first.
    pub features: Vec<String>,
    /// The core family tract tunes tile choices for (aarch64 only: `CortexA72`, `Generic`, …).
    pub core: Option<String>,
}

/// One representative matrix product and the kernel tract would run for it.
#[derive(Clone, Debug)]
pub struct KernelChoice {
    pub what: String,
    pub kernel: Option<String>,
}

/// The matmul kernels and convolution ops one optimized plan uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanKernels {
    /// Matmul kernel name → number of nodes calling it.
    pub matmul: BTreeMap<String, usize>,
    /// Convolution-related op (`LazyIm2col`, `DirectSpatialConv`, …) → count.
    pub conv_ops: BTreeMap<String, usize>,
}

impl PlanKernels {
    fn merge(&mut self, other: &PlanKernels) {
        for (name, n) in &other.matmul {
            *self.matmul.entry(name.clone()).or_default() += n;
        }
        for (name, n) in &other.conv_ops {
            *self.conv_ops.entry(name.clone()).or_default() += n;
        }
    }
}

pub fn cpu_report() -> CpuReport {
    let isa = tract_linalg::isa::native();
    CpuReport {
        arch: isa.arch().map_or("unknown".into(), |a| a.to_string()),
        level: isa.nickname().to_string(),
        features: isa.iter().map(|i| i.name().to_string()).collect(),
        core: core_kind(),
    }
}

#[cfg(target_arch = "aarch64")]
fn core_kind() -> Option<String> {
    Some(format!("{:?}", tract_linalg::arm64::Kind::choose()))
}

#[cfg(not(target_arch = "aarch64"))]
fn core_kind() -> Option<String> {
    None
}

/// The kernel family the `gemm` crate dispatches to on this CPU: its FMA
/// kernels on x86_64 with AVX2 and FMA, NEON on aarch64, portable Rust
/// otherwise (the `generic` prefix, which `doctor` warns about).
pub fn gemm_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2") {
        return "gemm-crate f32 fma (avx2)";
    }
    #[cfg(target_arch = "aarch64")]
    return "gemm-crate f32 neon";
    #[allow(unreachable_code)]
    "generic gemm-crate f32"
}

/// The kernel tract would pick for a few products that stand for the models'
/// work: a text-encoder matrix-vector product, a UNet 3×3 convolution as a
/// matmul (im2col), and the int8 and f16 paths quantized models take.
pub fn preferred_kernels() -> Vec<KernelChoice> {
    let dispatch = MmmDispatch::native();
    let cases: [(&str, DatumType, usize, usize, usize); 5] = [
        (
            "f32 matrix x vector (m 1024, k 1024, n 1)",
            DatumType::F32,
            1024,
            1024,
            1,
        ),
        (
            "f32 matmul (m 320, k 2880, n 4096): conv 3x3 via im2col",
            DatumType::F32,
            320,
            2880,
            4096,
        ),
        (
            "f32 matmul (m 77, k 1024, n 1024): attention / linear",
            DatumType::F32,
            77,
            1024,
            1024,
        ),
        (
            "f16 matmul (m 320, k 2880, n 4096)",
            DatumType::F16,
            320,
            2880,
            4096,
        ),
        (
            "int8 matmul, i32 accumulator (m 320, k 2880, n 4096)",
            DatumType::I32,
            320,
            2880,
            4096,
        ),
    ];
    cases
        .into_iter()
        .map(|(what, acc, m, k, n)| KernelChoice {
            what: what.to_string(),
            kernel: dispatch
                .pick(&Query::plain(acc, Some(m), Some(k), Some(n)))
                .map(|(mmm, _, _)| mmm.name().to_string()),
        })
        .collect()
}

/// The single-kernel routines convolutions and activations call, as tract resolves them here.
pub fn preferred_routines() -> Vec<KernelChoice> {
    let isa: IsaSet = tract_linalg::isa::native();
    let cases = [
        ("conv direct, 4 channels (f32)", Func::ConvW4),
        ("depthwise conv (f32)", Func::DepthwiseW),
        ("softmax rows (f32)", Func::SoftmaxRows),
        ("silu (f32)", Func::Silu),
        ("gelu (f32)", Func::Gelu),
        ("exp (f32)", Func::Exp),
    ];
    cases
        .into_iter()
        .map(|(what, func)| KernelChoice {
            what: what.to_string(),
            kernel: tract_linalg::routines::best_for(func, DatumType::F32, &isa)
                .map(|r| r.name().to_string()),
        })
        .collect()
}

/// Kernels of every plan built in this process, by model file. Filled by
/// the engine as it optimizes, so a report shows what a real run selected.
static PLAN_KERNELS: Mutex<BTreeMap<PathBuf, PlanKernels>> = Mutex::new(BTreeMap::new());

pub(super) fn note_plan(path: &Path, plan: &TypedRunnableModel) {
    let kernels = plan_kernels(plan.model());
    log::debug!(
        "{}: matmul kernels {:?}, conv ops {:?}",
        path.display(),
        kernels.matmul,
        kernels.conv_ops
    );
    // A poisoned lock only loses the report, never a generation.
    if let Ok(mut all) = PLAN_KERNELS.lock() {
        all.entry(path.to_path_buf()).or_default().merge(&kernels);
    }
}

/// What `note_plan` recorded so far, one entry per model file.
pub fn used_kernels() -> BTreeMap<PathBuf, PlanKernels> {
    PLAN_KERNELS
        .lock()
        .map(|all| all.clone())
        .unwrap_or_default()
}

fn plan_kernels(model: &TypedModel) -> PlanKernels {
    let mut kernels = PlanKernels::default();
    for node in model.nodes() {
        if let Some(op) = node.op_as::<OptMatMul>() {
            for mmm in &op.mmm {
                *kernels.matmul.entry(mmm.name().to_string()).or_default() += 1;
            }
        }
        if let Some(op) = node.op_as::<GemmConv>() {
            let name = format!("GemmConv ({})", op.layout.name());
            *kernels.conv_ops.entry(name).or_default() += 1;
            continue;
        }
        if node.op_is::<GemmProduct>() {
            *kernels.matmul.entry(gemm_kernel().to_string()).or_default() += 1;
            continue;
        }
        let name = node.op.name();
        if is_conv_op(&name) {
            *kernels.conv_ops.entry(name.to_string()).or_default() += 1;
        }
    }
    kernels
}

fn is_conv_op(name: &str) -> bool {
    ["Conv", "Im2col", "DepthWise", "Deconv"]
        .iter()
        .any(|part| name.contains(part))
}
