//! Schedulers against diffusers, using references written by
//! `tools/fixtures/schedulers.py`: timesteps, sigmas, initial noise scale and
//! complete denoising runs (with the same seeded noise) for every sampler,
//! timestep spacing, prediction type and several step counts, plus published
//! configs used across scheduler classes.

use std::path::Path;

use edgegen::rng::{NormalKernel, TorchGenerator};
use edgegen::scheduler::{self, SchedulerConfig, SchedulerKind};
use ndarray::ArrayD;
use serde::Deserialize;

/// Integral timesteps must be equal; fractional ones (Euler) are float32
/// values in diffusers and must match within 1e-9, i.e. be the same float32.
const TIMESTEP_TOLERANCE: f64 = 1e-9;
/// Karras timesteps come from interpolating `np.log` of the float32 training
/// sigmas. On x86 numpy evaluates that log with a SIMD polynomial that is off
/// from the correctly rounded value (libm, and numpy on aarch64) by an ulp for
/// ~8% of inputs, which moves the fractional timestep by up to ~1e-4; edgegen
/// follows libm. Bounded at 1e-3, far below what a UNet can tell apart, and
/// far above nothing: a wrong schedule is off by whole timesteps.
const KARRAS_TIMESTEP_TOLERANCE: f64 = 1e-3;
/// Sigmas are float32 in diffusers; the fixture rounds them to 8 significant
/// digits.
const SIGMA_RELATIVE_TOLERANCE: f64 = 1e-6;
/// Denoising runs repeat diffusers' float32 step arithmetic operation by
/// operation, but torch's vectorised kernels (tanh in the stand-in model,
/// SIMD division) may round differently from libm by an ulp, and 25 steps
/// amplify that; the largest difference seen is 3e-6 of max(1, |value|).
/// So: 1e-4 absolute, scaled by the magnitude for the large values that
/// cosine and zero-SNR schedules reach (up to ~1e4, where one float32 ulp is
/// already 1e-3), since float32 rounding error is relative. A wrong
/// coefficient, timestep or noise draw moves samples by 1e-2 relative or more.
const SAMPLE_TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    latent_shape: Vec<usize>,
    sample_stride: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    config: serde_json::Value,
    steps: usize,
    seed: u64,
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: f64,
    final_sample: Vec<f32>,
}

fn reference() -> Reference {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers/reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn config_of(case: &Case) -> SchedulerConfig {
    SchedulerConfig::from_json(&case.config.to_string())
        .unwrap_or_else(|e| panic!("{}: config does not parse: {e:#}", case.name))
}

fn build(case: &Case) -> Box<dyn scheduler::Scheduler> {
    let kind: SchedulerKind = case.kind.parse().expect("fixture kinds are valid names");
    scheduler::build(kind, &config_of(case), case.steps)
        .unwrap_or_else(|e| panic!("{}: build failed: {e:#}", case.name))
}

fn uses_karras(case: &Case) -> bool {
    case.kind == "dpmpp_2m_karras"
        || (case.kind == "euler"
            && case.config.get("use_karras_sigmas") == Some(&serde_json::Value::Bool(true)))
}

/// The stand-in for a UNet that `tools/fixtures/schedulers.py` uses:
/// `0.3 * torch.tanh(sample) + float(timestep) * 1e-5`, in float32.
fn fake_model(sample: &ArrayD<f32>, timestep: f64) -> ArrayD<f32> {
    let shift = (timestep * 1e-5) as f32;
    sample.mapv(|x| 0.3 * x.tanh() + shift)
}

#[test]
fn timesteps_match_diffusers() {
    let reference = reference();
    let mut worst_karras = 0f64;
    for case in &reference.cases {
        let scheduler = build(case);
        let actual = scheduler.timesteps();
        assert_eq!(
            actual.len(),
            case.timesteps.len(),
            "{}: number of timesteps",
            case.name
        );
        let tolerance = if uses_karras(case) {
            KARRAS_TIMESTEP_TOLERANCE
        } else {
            TIMESTEP_TOLERANCE
        };
        for (i, (a, e)) in actual.iter().zip(&case.timesteps).enumerate() {
            let diff = (a - e).abs();
            assert!(
                diff <= tolerance,
                "{}: timestep {i} is {a}, diffusers gives {e}",
                case.name
            );
            if uses_karras(case) {
                worst_karras = worst_karras.max(diff);
            }
        }
    }
    eprintln!("worst Karras timestep difference: {worst_karras:e}");
}

#[test]
fn sigmas_and_initial_noise_match_diffusers() {
    let reference = reference();
    for case in &reference.cases {
        let scheduler = build(case);
        let init = scheduler.init_noise_sigma();
        assert!(
            (init - case.init_noise_sigma).abs()
                <= SIGMA_RELATIVE_TOLERANCE * case.init_noise_sigma.abs(),
            "{}: init_noise_sigma is {init}, diffusers gives {}",
            case.name,
            case.init_noise_sigma
        );
        let (Some(expected), Some(actual)) = (&case.sigmas, scheduler.sigmas()) else {
            assert_eq!(
                case.sigmas.is_some(),
                scheduler.sigmas().is_some(),
                "{}: only one side has sigmas",
                case.name
            );
            continue;
        };
        assert_eq!(
            actual.len(),
            expected.len(),
            "{}: number of sigmas",
            case.name
        );
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let diff = (f64::from(a) - e).abs();
            assert!(
                diff <= SIGMA_RELATIVE_TOLERANCE * e.abs(),
                "{}: sigma {i} is {a}, diffusers gives {e}",
                case.name
            );
        }
    }
}

#[test]
fn denoising_runs_match_diffusers() {
    let reference = reference();
    let mut worst = 0f32;
    for case in &reference.cases {
        let mut scheduler = build(case);
        // The references were drawn on x86-64, so follow PyTorch's x86 kernel
        // whatever machine runs the test.
        let mut rng = TorchGenerator::with_kernel(case.seed, NormalKernel::Avx2);
        let mut latents = rng.randn(&reference.latent_shape) * scheduler.init_noise_sigma() as f32;
        let timesteps = scheduler.timesteps().to_vec();
        for (index, &timestep) in timesteps.iter().enumerate() {
            let model_input = scheduler.scale_model_input(latents.clone(), index);
            let model_output = fake_model(&model_input, timestep);
            latents = scheduler.step(&model_output, index, &latents, &mut rng);
        }
        let sampled: Vec<f32> = latents
            .iter()
            .step_by(reference.sample_stride)
            .copied()
            .collect();
        assert_eq!(
            sampled.len(),
            case.final_sample.len(),
            "{}: sample size",
            case.name
        );
        for (i, (a, e)) in sampled.iter().zip(&case.final_sample).enumerate() {
            let diff = (a - e).abs();
            assert!(
                diff <= SAMPLE_TOLERANCE * e.abs().max(1.0),
                "{}: final sample element {} is {a}, diffusers gives {e}",
                case.name,
                i * reference.sample_stride
            );
            worst = worst.max(diff / e.abs().max(1.0));
        }
    }
    eprintln!("worst final-sample difference relative to max(1, |value|): {worst:e}");
}

#[test]
fn every_scheduler_and_spacing_is_covered() {
    let reference = reference();
    for kind in SchedulerKind::ALL {
        let count = reference
            .cases
            .iter()
            .filter(|c| c.kind == kind.name())
            .count();
        assert!(count >= 20, "only {count} reference cases for {kind}");
    }
    for spacing in ["leading", "trailing", "linspace"] {
        let covered = reference
            .cases
            .iter()
            .any(|c| c.config.get("timestep_spacing").and_then(|v| v.as_str()) == Some(spacing));
        assert!(covered, "no reference case with timestep_spacing {spacing}");
    }
}

#[test]
fn names_round_trip_and_unknown_names_list_the_valid_ones() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.name().parse::<SchedulerKind>().ok(), Some(kind));
    }
    let error = "dpm++"
        .parse::<SchedulerKind>()
        .expect_err("not a scheduler name")
        .to_string();
    for kind in SchedulerKind::ALL {
        assert!(
            error.contains(kind.name()),
            "error {error:?} does not list {kind}"
        );
    }
}

#[test]
fn default_kind_follows_class_name() {
    let kind_of = |json: &str| {
        SchedulerConfig::from_json(json)
            .expect("valid config")
            .default_kind()
    };
    assert_eq!(
        kind_of(r#"{"_class_name": "EulerDiscreteScheduler"}"#),
        Some(SchedulerKind::Euler)
    );
    assert_eq!(
        kind_of(r#"{"_class_name": "EulerAncestralDiscreteScheduler"}"#),
        Some(SchedulerKind::EulerAncestral)
    );
    assert_eq!(
        kind_of(r#"{"_class_name": "DDIMScheduler"}"#),
        Some(SchedulerKind::Ddim)
    );
    assert_eq!(
        kind_of(r#"{"_class_name": "DPMSolverMultistepScheduler"}"#),
        Some(SchedulerKind::DpmPp2m)
    );
    assert_eq!(
        kind_of(r#"{"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true}"#),
        Some(SchedulerKind::DpmPp2mKarras)
    );
    assert_eq!(
        kind_of(r#"{"_class_name": "LCMScheduler"}"#),
        Some(SchedulerKind::Lcm)
    );
    assert_eq!(
        kind_of(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#),
        None
    );
    assert_eq!(kind_of(r#"{}"#), None);
}

#[test]
fn unsupported_settings_are_errors_not_silent_differences() {
    let config = |json: &str| SchedulerConfig::from_json(json).expect("valid config");
    let fails = |kind: SchedulerKind, json: &str| scheduler::build(kind, &config(json), 4).is_err();
    assert!(fails(
        SchedulerKind::EulerAncestral,
        r#"{"prediction_type": "sample"}"#
    ));
    assert!(fails(SchedulerKind::Ddim, r#"{"thresholding": true}"#));
    assert!(fails(
        SchedulerKind::Euler,
        r#"{"interpolation_type": "log_linear"}"#
    ));
    assert!(fails(SchedulerKind::DpmPp2m, r#"{"use_lu_lambdas": true}"#));
    assert!(fails(
        SchedulerKind::Euler,
        r#"{"beta_schedule": "sigmoid"}"#
    ));
    assert!(fails(
        SchedulerKind::Ddim,
        r#"{"prediction_type": "flow_prediction"}"#
    ));
    assert!(fails(
        SchedulerKind::Lcm,
        r#"{"original_inference_steps": 2}"#
    ));
    assert!(scheduler::build(SchedulerKind::Euler, &config("{}"), 0).is_err());
    // Keys another class reads are ignored, as diffusers ignores them.
    assert!(!fails(
        SchedulerKind::EulerAncestral,
        r#"{"use_karras_sigmas": true, "solver_order": 3}"#
    ));
}

#[test]
fn config_file_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, "{\"beta_start\": \"high\"}").expect("write config");
    let error = format!(
        "{:#}",
        SchedulerConfig::from_file(&path).expect_err("bad value")
    );
    assert!(error.contains("scheduler_config.json"), "{error}");
    let missing = format!(
        "{:#}",
        SchedulerConfig::from_file(&dir.path().join("none.json")).expect_err("no file")
    );
    assert!(missing.contains("none.json"), "{missing}");
}
