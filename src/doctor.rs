//! `edgegen doctor`: what this machine gives the engine — the CPU features
//! detected, the kernels tract prefers here, and the kernels the optimized
//! graphs of a real (one-step, in-memory) generation actually call — so a
//! user can see the build was optimized for the board.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::bundle::{Bundle, BundleKind};
use crate::commands;
use crate::config::{Config, MatMulSetting};
use crate::engine::kernels::{self, CpuReport, KernelChoice, PlanKernels};
use crate::engine::MatrixPath;
use crate::request::Request;

/// What the report checks a generation against.
pub struct DoctorOptions<'a> {
    /// Model to run once; `None` uses `models.default`.
    pub model: Option<&'a str>,
    /// Skip the generation: CPU and kernel preferences only.
    pub skip_model: bool,
}

/// The full report, as text for a terminal or a support ticket.
pub fn report(config: &Config, options: &DoctorOptions) -> Result<String> {
    let mut out = String::new();
    write_build(&mut out)?;
    write_cpu(&mut out, &kernels::cpu_report())?;
    write_choices(
        &mut out,
        "matmul kernels tract prefers here",
        &kernels::preferred_kernels(),
    )?;
    write_choices(
        &mut out,
        "routines (conv, activations)",
        &kernels::preferred_routines(),
    )?;
    write_matrix_path(&mut out, config)?;
    if options.skip_model {
        return Ok(out);
    }
    let bundle = commands::open_model(config, options.model)?;
    let millis = run_once(config, &bundle)?;
    writeln!(
        out,
        "\nmodel {} (one {}-step generation in {millis:.0} ms, nothing written)",
        bundle.id,
        if bundle.kind() == BundleKind::Diffusion {
            "1"
        } else {
            "single"
        }
    )?;
    let used = kernels::used_kernels();
    for (path, plan) in &used {
        write_plan(&mut out, relative_to(path, &bundle.dir), plan)?;
    }
    writeln!(out, "\n{}", verdict(used.values()))?;
    Ok(out)
}

fn write_build(out: &mut String) -> Result<()> {
    writeln!(out, "edgegen {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(
        out,
        "build: {}-{}, compiled-in target features: {}, cuda feature: {}",
        std::env::consts::ARCH,
        std::env::consts::OS,
        compiled_features().join(" "),
        if cfg!(feature = "cuda") { "on" } else { "off" }
    )?;
    writeln!(out, "threads available: {}", available_threads())?;
    Ok(())
}

fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Features the compiler was allowed to assume (`-C target-cpu` / `target-feature`).
fn compiled_features() -> Vec<&'static str> {
    let mut features = Vec::new();
    if cfg!(target_feature = "neon") {
        features.push("neon");
    }
    if cfg!(target_feature = "fp16") {
        features.push("fp16");
    }
    if cfg!(target_feature = "dotprod") {
        features.push("dotprod");
    }
    if cfg!(target_feature = "sse2") {
        features.push("sse2");
    }
    if cfg!(target_feature = "avx2") {
        features.push("avx2");
    }
    if cfg!(target_feature = "fma") {
        features.push("fma");
    }
    if features.is_empty() {
        features.push("(baseline)");
    }
    features
}

/// Where convolutions and large matrix products run: the gemm crate's
/// kernels (stride-1 convolutions as shifted taps, 1×1 ones as one product,
/// others through im2col) or tract's for everything.
fn write_matrix_path(out: &mut String, config: &Config) -> Result<()> {
    let path = config.matrix_path();
    let why = match config.engine.matmul {
        MatMulSetting::Auto => format!(
            "engine.matmul = \"auto\": the default on {}",
            std::env::consts::ARCH
        ),
        setting => format!(
            "engine.matmul = \"{}\"",
            format!("{setting:?}").to_lowercase()
        ),
    };
    writeln!(
        out,
        "
matrix path: {} ({why})",
        path.name()
    )?;
    match path {
        MatrixPath::Gemm | MatrixPath::GemmAll => {
            writeln!(
                out,
                "  large f32 convolutions and matrix products: {}",
                kernels::gemm_kernel()
            )?;
            writeln!(out, "  small, depthwise, grouped, int8 and f16 ones: tract")?;
        }
        MatrixPath::Tract => writeln!(out, "  every convolution and matrix product: tract")?,
    }
    Ok(())
}

fn write_cpu(out: &mut String, cpu: &CpuReport) -> Result<()> {
    writeln!(out, "\ncpu (as tract detected it)")?;
    writeln!(out, "  arch: {}, level: {}", cpu.arch, cpu.level)?;
    writeln!(out, "  features: {}", cpu.features.join(", "))?;
    if let Some(core) = &cpu.core {
        writeln!(out, "  core family for tile choice: {core}")?;
    }
    writeln!(out, "  os reports: {}", os_detected_features().join(", "))?;
    Ok(())
}

/// The same question asked of the OS (hwcaps / cpuid) through std, as a cross-check on tract.
fn os_detected_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found: Vec<&'static str> = Vec::new();
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        for (name, present) in [
            ("neon", has!("neon")),
            ("fp16", has!("fp16")),
            ("dotprod", has!("dotprod")),
            ("sve", has!("sve")),
            ("sve2", has!("sve2")),
        ] {
            if present {
                found.push(name);
            }
        }
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        use std::arch::is_x86_feature_detected as has;
        for (name, present) in [
            ("avx", has!("avx")),
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avx512f", has!("avx512f")),
        ] {
            if present {
                found.push(name);
            }
        }
    }
    if found.is_empty() {
        found.push("(none asked on this architecture)");
    }
    found
}

fn write_choices(out: &mut String, title: &str, choices: &[KernelChoice]) -> Result<()> {
    writeln!(out, "\n{title}")?;
    for choice in choices {
        let kernel = choice.kernel.as_deref().unwrap_or("(none)");
        writeln!(out, "  {:<56} {kernel}", choice.what)?;
    }
    Ok(())
}

/// One tiny generation, so the engine optimizes every graph of the bundle
/// for real shapes and records which kernels the plans call.
fn run_once(config: &Config, bundle: &Bundle) -> Result<f64> {
    let pipeline = commands::load_pipeline(config, bundle)?;
    let request = Request {
        prompt: Some("doctor".into()),
        seed: Some(0),
        steps: (bundle.kind() == BundleKind::Diffusion).then_some(1),
        ..Request::default()
    };
    let settings = pipeline
        .resolve(&request, &config.limits)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("settings for a test generation with '{}'", bundle.id))?;
    let mut keep_going = |_: usize, _: usize| true;
    let generated = pipeline
        .generate(&settings, &mut keep_going)
        .with_context(|| format!("test generation with '{}'", bundle.id))?;
    Ok(generated.timings.total_ms)
}

fn relative_to<'a>(path: &'a Path, dir: &Path) -> &'a Path {
    path.strip_prefix(dir).unwrap_or(path)
}

fn write_plan(out: &mut String, component: &Path, plan: &PlanKernels) -> Result<()> {
    writeln!(out, "  {}", component.display())?;
    writeln!(out, "    matmul: {}", counted(&plan.matmul))?;
    writeln!(out, "    conv ops: {}", counted(&plan.conv_ops))?;
    Ok(())
}

fn counted(items: &std::collections::BTreeMap<String, usize>) -> String {
    if items.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = items
        .iter()
        .map(|(name, n)| format!("{name} x{n}"))
        .collect();
    parts.join(", ")
}

/// Kernels that use no SIMD unit: tract's portable Rust ones and the armv7
/// VFP fallback it runs when it finds no NEON.
const NON_SIMD_PREFIXES: [&str; 2] = ["generic", "armvfpv2"];

/// Non-SIMD kernels mean the build or the CPU probe left SIMD unused: worth
/// a warning, because they cost several times the time.
pub fn verdict<'a>(plans: impl Iterator<Item = &'a PlanKernels>) -> String {
    let mut generic = Vec::new();
    let mut simd = Vec::new();
    for plan in plans {
        for name in plan.matmul.keys() {
            if NON_SIMD_PREFIXES.iter().any(|p| name.starts_with(p)) {
                generic.push(name.as_str());
            } else {
                simd.push(name.as_str());
            }
        }
    }
    simd.sort_unstable();
    simd.dedup();
    generic.sort_unstable();
    generic.dedup();
    match (simd.is_empty(), generic.is_empty()) {
        (true, true) => "no matmul ran: nothing to judge".into(),
        (false, true) => format!("ok: every matmul uses SIMD kernels ({})", simd.join(", ")),
        (_, false) => format!(
            "warning: portable (non-SIMD) matmul kernels in use: {}",
            generic.join(", ")
        ),
    }
}
