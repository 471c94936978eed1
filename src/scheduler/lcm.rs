//! Latent consistency sampler: diffusers' `LCMScheduler`.
//!
//! Timesteps are a subset of the distillation schedule
//! (`original_inference_steps`), whatever `timestep_spacing` says. Each step
//! applies the consistency boundary condition `c_skip * x + c_out * x₀`;
//! every step but the last then re-noises to the next timestep with
//! `randn(model_output.shape)` from the generator.

use anyhow::ensure;
use ndarray::ArrayD;

use super::schedule::{self, BetaDefaults, NoiseSchedule};
use super::{clip_range, reject_enabled, zip_map, PredictionType, Scheduler, SchedulerConfig};
use crate::rng::TorchGenerator;

/// LCMScheduler's beta defaults are Stable Diffusion's.
const LCM_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
};

/// `sigma_data` of the consistency-model parameterisation.
const SIGMA_DATA: f32 = 0.5;

pub(crate) struct LcmScheduler {
    timesteps: Vec<f64>,
    train_timesteps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    clip_range: Option<f32>,
    timestep_scaling: f32,
}

impl LcmScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        reject_enabled(&[("thresholding", config.thresholding)])?;
        let schedule = NoiseSchedule::from_config(config, LCM_BETAS)?;
        let original_steps = config.original_inference_steps.unwrap_or(50);
        let train_timesteps = lcm_timesteps(schedule.train_steps(), original_steps, steps)?;
        Ok(Self {
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            alphas_cumprod: schedule.alphas_cumprod,
            prediction: PredictionType::parse(config)?,
            clip_range: clip_range(config, false)?,
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0) as f32,
        })
    }

    /// `get_scalings_for_boundary_condition_discrete`: (c_skip, c_out).
    fn boundary_scalings(&self, timestep: usize) -> (f32, f32) {
        let scaled = timestep as f32 * self.timestep_scaling;
        let denominator = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        // `0.25 / tensor` is evaluated by torch as reciprocal(tensor) * 0.25.
        let c_skip = (1.0 / denominator) * (SIGMA_DATA * SIGMA_DATA);
        let c_out = scaled / denominator.sqrt();
        (c_skip, c_out)
    }
}

/// `LCMScheduler.set_timesteps(steps)`: every k-th training timestep of the
/// distillation schedule, then `steps` of those evenly from the top.
fn lcm_timesteps(
    train_steps: usize,
    original_steps: usize,
    steps: usize,
) -> anyhow::Result<Vec<usize>> {
    ensure!(
        (1..=train_steps).contains(&original_steps),
        "original_inference_steps {original_steps} must be between 1 and num_train_timesteps {train_steps}"
    );
    ensure!(
        steps <= original_steps,
        "{steps} steps is more than original_inference_steps {original_steps}: LCM timesteps are a subset of those"
    );
    let k = train_steps / original_steps;
    let origin: Vec<usize> = (1..=original_steps).rev().map(|i| i * k - 1).collect();
    Ok(schedule::np_linspace_open(0.0, origin.len() as f64, steps)
        .into_iter()
        .map(|index| origin[index.floor() as usize])
        .collect())
}

impl Scheduler for LcmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: ArrayD<f32>, _step_index: usize) -> ArrayD<f32> {
        sample
    }

    fn step(
        &mut self,
        model_output: &ArrayD<f32>,
        step_index: usize,
        sample: &ArrayD<f32>,
        rng: &mut TorchGenerator,
    ) -> ArrayD<f32> {
        let t = self.train_timesteps[step_index];
        let is_last = step_index + 1 == self.train_timesteps.len();
        // diffusers' "previous" timestep is the next one visited; on the last
        // step it is the current one (and is then unused). LCM timesteps are
        // never negative, so `final_alpha_cumprod` (set_alpha_to_one) is
        // never reached.
        let prev_t = if is_last {
            t
        } else {
            self.train_timesteps[step_index + 1]
        };
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = self.alphas_cumprod[prev_t];
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());

        let mut original = match self.prediction {
            PredictionType::Epsilon => zip_map(sample, model_output, |x, eps| {
                (x - sqrt_beta * eps) / sqrt_alpha
            }),
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                zip_map(sample, model_output, |x, v| sqrt_alpha * x - sqrt_beta * v)
            }
        };
        if let Some(range) = self.clip_range {
            original.mapv_inplace(|x| x.clamp(-range, range));
        }
        let (c_skip, c_out) = self.boundary_scalings(t);
        let denoised = zip_map(&original, sample, |x0, x| c_out * x0 + c_skip * x);
        if is_last {
            return denoised;
        }
        let noise = rng.randn(model_output.shape());
        let (sqrt_alpha_prev, sqrt_beta_prev) = (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt());
        zip_map(&denoised, &noise, |d, n| {
            sqrt_alpha_prev * d + sqrt_beta_prev * n
        })
    }
}
