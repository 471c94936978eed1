//! Samplers for the denoising loop, each a port of the diffusers scheduler of
//! the same name, built from a model's `scheduler/scheduler_config.json`.
//!
//! The aim is that a seed gives the picture diffusers gives: timesteps,
//! sigmas and step arithmetic follow diffusers' code (numpy float64 where it
//! uses numpy, float32 where it uses torch), and noise is drawn from the
//! caller's [`TorchGenerator`] at the same points and with the same shapes.
//!
//! A config written for one class can drive another, as with diffusers'
//! `Target.from_config(pipe.scheduler.config)`: keys present in the file are
//! used, keys absent take the *target* class's defaults (diffusers records
//! which keys were defaulted and drops them when switching class). That is
//! why [`SchedulerConfig`] keeps every field optional and each scheduler
//! resolves its own defaults.

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lcm;
mod schedule;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context};
use ndarray::ArrayD;
use serde::{Deserialize, Deserializer};

use crate::rng::TorchGenerator;

/// One sampler set up for a fixed number of steps.
///
/// The denoising loop calls, for `step_index` = 0, 1, … in order:
/// `scale_model_input` on the UNet input, the UNet with
/// `timesteps()[step_index]`, then `step` on its (guided) output. A
/// `step_index` outside `0..timesteps().len()`, or `step` arguments of
/// different shapes, are programming errors and panic.
pub trait Scheduler: Send {
    /// Timesteps as diffusers passes them to the UNet, in visiting order.
    /// Integral for most samplers; fractional for Euler with Karras sigmas,
    /// `linspace` spacing or continuous timesteps.
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial latent noise.
    fn init_noise_sigma(&self) -> f64;

    /// Noise levels σ (variance-exploding) for each timestep plus the one
    /// after the last step, for samplers defined by them.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// Scales the denoising model's input for the given step.
    fn scale_model_input(&self, sample: ArrayD<f32>, step_index: usize) -> ArrayD<f32>;

    /// Advances `sample` by one step given the model output, drawing any noise
    /// the sampler needs from `rng` exactly when diffusers draws it.
    fn step(
        &mut self,
        model_output: &ArrayD<f32>,
        step_index: usize,
        sample: &ArrayD<f32>,
        rng: &mut TorchGenerator,
    ) -> ArrayD<f32>;
}

/// The samplers edgegen offers, by their request/CLI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Ddim,
    DpmPp2m,
    DpmPp2mKarras,
    Lcm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Lcm,
    ];

    /// The name used in requests, on the command line and in PNG metadata.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// The diffusers class this sampler reproduces.
    pub fn diffusers_class(&self) -> &'static str {
        match self {
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialized as its name, e.g. `"euler_a"`.
impl serde::Serialize for SchedulerKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for SchedulerKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> anyhow::Result<Self> {
        SchedulerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let valid: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
                anyhow::anyhow!(
                    "unknown scheduler {name:?}; valid names: {}",
                    valid.join(", ")
                )
            })
    }
}

/// A diffusers `scheduler_config.json`. Every field is optional: an absent
/// field takes the default of the class that uses the config (see the module
/// documentation). Unknown fields are ignored, as diffusers writes many.
#[derive(Deserialize, Clone, Debug, Default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub beta_start: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub thresholding: Option<bool>,
    // DDIM, LCM
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub clip_sample_range: Option<f64>,
    // Euler, DPM-Solver
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub final_sigmas_type: Option<String>,
    // Euler
    #[serde(default, deserialize_with = "lenient_f64")]
    pub sigma_min: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub sigma_max: Option<f64>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    // DPM-Solver
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    // LCM
    pub original_inference_steps: Option<usize>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scheduler config {}", path.display()))?;
        Self::from_json(&text)
            .with_context(|| format!("parsing scheduler config {}", path.display()))
    }

    /// Parses the text of a `scheduler_config.json`. Python's json module
    /// writes non-finite floats as bare `Infinity`, `-Infinity` and `NaN`
    /// (diffusers' default `lambda_min_clipped` is -inf); those are accepted.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let text = quote_non_finite_numbers(text);
        Ok(serde_json::from_str(&text)?)
    }

    /// The sampler matching the config's `_class_name`, if edgegen has it.
    pub fn default_kind(&self) -> Option<SchedulerKind> {
        match self.class_name.as_deref()? {
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestral),
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "DPMSolverMultistepScheduler" if self.use_karras_sigmas == Some(true) => {
                Some(SchedulerKind::DpmPp2mKarras)
            }
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmPp2m),
            "LCMScheduler" => Some(SchedulerKind::Lcm),
            _ => None,
        }
    }
}

/// Builds the sampler `kind` from `config` for `steps` denoising steps.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> anyhow::Result<Box<dyn Scheduler>> {
    if steps == 0 {
        bail!("{kind}: the number of steps must be at least 1");
    }
    let built: anyhow::Result<Box<dyn Scheduler>> = match kind {
        SchedulerKind::Euler => euler::EulerScheduler::new(config, steps).map(|s| Box::new(s) as _),
        SchedulerKind::EulerAncestral => {
            euler_ancestral::EulerAncestralScheduler::new(config, steps).map(|s| Box::new(s) as _)
        }
        SchedulerKind::Ddim => ddim::DdimScheduler::new(config, steps).map(|s| Box::new(s) as _),
        SchedulerKind::DpmPp2m => {
            dpm_solver::DpmSolverScheduler::new(config, steps, false).map(|s| Box::new(s) as _)
        }
        SchedulerKind::DpmPp2mKarras => {
            dpm_solver::DpmSolverScheduler::new(config, steps, true).map(|s| Box::new(s) as _)
        }
        SchedulerKind::Lcm => lcm::LcmScheduler::new(config, steps).map(|s| Box::new(s) as _),
    };
    built.with_context(|| format!("setting up scheduler {kind} for {steps} steps"))
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    fn parse(config: &SchedulerConfig) -> anyhow::Result<Self> {
        match config.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            // diffusers' Euler still accepts the old name.
            "sample" | "original_sample" => Ok(PredictionType::Sample),
            other => {
                bail!("prediction_type {other:?} is not supported (epsilon, v_prediction, sample)")
            }
        }
    }
}

/// How inference timesteps are spread over the training range
/// (`timestep_spacing`, table 2 of "Common Diffusion Noise Schedules and
/// Sample Steps are Flawed").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    fn parse(config: &SchedulerConfig, class_default: TimestepSpacing) -> anyhow::Result<Self> {
        match config.timestep_spacing.as_deref() {
            None => Ok(class_default),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some(other) => {
                bail!("timestep_spacing {other:?} is not supported (leading, trailing, linspace)")
            }
        }
    }
}

/// `final_sigmas_type`: the sigma after the last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FinalSigma {
    Zero,
    SigmaMin,
}

impl FinalSigma {
    fn parse(config: &SchedulerConfig) -> anyhow::Result<Self> {
        match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => Ok(FinalSigma::Zero),
            "sigma_min" => Ok(FinalSigma::SigmaMin),
            other => bail!("final_sigmas_type {other:?} is not supported (zero, sigma_min)"),
        }
    }
}

/// `clip_sample` / `clip_sample_range` of DDIM and LCM: the range x₀ is
/// clamped to, if clipping is on.
fn clip_range(config: &SchedulerConfig, class_default: bool) -> anyhow::Result<Option<f32>> {
    if !config.clip_sample.unwrap_or(class_default) {
        return Ok(None);
    }
    let range = config.clip_sample_range.unwrap_or(1.0);
    if range.is_nan() || range < 0.0 {
        bail!("clip_sample_range must be a non-negative number, got {range}");
    }
    Ok(Some(range as f32))
}

/// Fails on config switches that change the arithmetic in ways edgegen does
/// not implement, rather than silently sampling differently from diffusers.
fn reject_enabled(flags: &[(&str, Option<bool>)]) -> anyhow::Result<()> {
    for (name, value) in flags {
        if *value == Some(true) {
            bail!("{name} = true is not supported");
        }
    }
    Ok(())
}

/// Applies `f` elementwise to two tensors of the same shape.
fn zip_map(a: &ArrayD<f32>, b: &ArrayD<f32>, f: impl Fn(f32, f32) -> f32) -> ArrayD<f32> {
    assert_eq!(
        a.shape(),
        b.shape(),
        "scheduler inputs must have the same shape"
    );
    ndarray::Zip::from(a).and(b).map_collect(|&x, &y| f(x, y))
}

/// Accepts a number, null, or one of the strings "Infinity", "-Infinity",
/// "NaN" (what [`quote_non_finite_numbers`] turns Python's bare tokens into).
fn lenient_f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrWord {
        Number(f64),
        Word(String),
    }
    match Option::<NumberOrWord>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumberOrWord::Number(value)) => Ok(Some(value)),
        Some(NumberOrWord::Word(word)) => match word.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, found {other:?}"
            ))),
        },
    }
}

/// Quotes the bare `Infinity`, `-Infinity` and `NaN` tokens Python writes
/// into JSON, leaving string contents untouched, so serde_json can read it.
fn quote_non_finite_numbers(text: &str) -> String {
    const WORDS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = WORDS.iter().find(|w| rest.starts_with(**w)) {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_floats_parse() {
        let config = SchedulerConfig::from_json(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "sigma_max": Infinity, "beta_start": NaN, "prediction_type": "NaN-Infinity"}"#,
        )
        .expect("parses");
        assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(config.sigma_max, Some(f64::INFINITY));
        assert!(config.beta_start.is_some_and(f64::is_nan));
        assert_eq!(config.prediction_type.as_deref(), Some("NaN-Infinity"));
    }
}
