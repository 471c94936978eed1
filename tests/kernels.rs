//! The kernel report `edgegen doctor` prints: after a real run, the plans'
//! matmul kernels are recorded, and on the architectures tract has SIMD
//! kernels for they are those, not the portable ones. Run under qemu with
//! `-cpu cortex-a72` (cross/build.sh) this is the check that a Raspberry Pi
//! gets tract's NEON (`arm64simd`) kernels.
//!
//! No numeric tolerance: kernel names are compared exactly.

mod common;

use common::fixtures;
use edgegen::doctor::verdict;
use edgegen::engine::kernels::{cpu_report, preferred_kernels, used_kernels};
use edgegen::engine::{Input, OnnxModel};
use ndarray::{ArrayD, IxDyn};

/// Runs the tiny VAE decoder (convolutions and attention) once.
fn run_vae_decoder() -> std::path::PathBuf {
    let path = fixtures().join("bundles/tiny-sd/vae_decoder/model.onnx");
    let model = OnnxModel::load(&path).unwrap();
    let spec = model.inputs()[0].clone();
    let latent_channels = spec
        .shape
        .as_ref()
        .and_then(|s| s.get(1).copied().flatten())
        .unwrap_or(4);
    let latent = ArrayD::from_elem(IxDyn(&[1, latent_channels, 8, 8]), 0.1f32);
    model.run(vec![(&spec.name, Input::Float(latent))]).unwrap();
    path
}

#[test]
fn a_run_records_its_matmul_kernels() {
    let path = run_vae_decoder();
    let used = used_kernels();
    let plan = used
        .get(&path)
        .expect("the plan built by the run is recorded under its file");
    assert!(
        !plan.matmul.is_empty(),
        "the VAE decoder's convolutions run as matmuls: {plan:?}"
    );
    let verdict = verdict(used.values());
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        assert!(verdict.starts_with("ok"), "{verdict}");
    }
}

/// On aarch64 without SVE2 or FP16 arithmetic (Pi 3/4, Pi Zero 2, and qemu's
/// cortex-a72) tract's choice is its NEON kernel family.
#[test]
fn aarch64_without_extensions_uses_neon_kernels() {
    let cpu = cpu_report();
    if cpu.arch != "aarch64" || cpu.features.iter().any(|f| f == "sve2" || f == "fp16") {
        return;
    }
    assert_eq!(cpu.level, "neon");
    let path = run_vae_decoder();
    let used = used_kernels();
    for kernel in used[&path].matmul.keys() {
        assert!(
            kernel.starts_with("arm64simd"),
            "{kernel} is not a NEON kernel"
        );
    }
    for choice in preferred_kernels()
        .iter()
        .filter(|c| c.what.starts_with("f32"))
    {
        let kernel = choice.kernel.as_deref().unwrap_or("none");
        assert!(kernel.starts_with("arm64simd"), "{}: {kernel}", choice.what);
    }
}
