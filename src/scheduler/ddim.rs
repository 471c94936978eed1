//! DDIM sampler: diffusers' `DDIMScheduler` with η = 0 (the pipelines'
//! default), which is deterministic and draws no noise.

use anyhow::ensure;
use ndarray::ArrayD;

use super::schedule::{self, NoiseSchedule, DDPM_BETAS};
use super::{
    clip_range, reject_enabled, zip_map, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};
use crate::rng::TorchGenerator;

pub(crate) struct DdimScheduler {
    timesteps: Vec<f64>,
    train_timesteps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    /// ᾱ used after the last training timestep (`final_alpha_cumprod`).
    final_alpha_cumprod: f32,
    /// diffusers steps back by `num_train_timesteps // steps` whatever the
    /// spacing, so the previous timestep is not always the next one visited.
    step_back: usize,
    prediction: PredictionType,
    clip_range: Option<f32>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        reject_enabled(&[("thresholding", config.thresholding)])?;
        let schedule = NoiseSchedule::from_config(config, DDPM_BETAS)?;
        let train_steps = schedule.train_steps();
        let spacing = TimestepSpacing::parse(config, TimestepSpacing::Leading)?;
        let offset = config.steps_offset.unwrap_or(0);
        let train_timesteps = integer_timesteps(spacing, train_steps, steps, offset)?;
        let clip_range = clip_range(config, true)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            alphas_cumprod: schedule.alphas_cumprod,
            final_alpha_cumprod,
            step_back: train_steps / steps,
            prediction: PredictionType::parse(config)?,
            clip_range,
        })
    }
}

/// `DDIMScheduler.set_timesteps` for each spacing.
fn integer_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    offset: usize,
) -> anyhow::Result<Vec<usize>> {
    ensure!(
        steps <= train_steps,
        "{steps} steps is more than the {train_steps} training timesteps"
    );
    let timesteps: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => schedule::np_linspace(0.0, (train_steps - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(schedule::np_round)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => schedule::np_arange(
            train_steps as f64,
            0.0,
            -(train_steps as f64 / steps as f64),
        )
        .into_iter()
        .map(|t| schedule::np_round(t) - 1.0)
        .collect(),
    };
    schedule::checked_train_timesteps(&timesteps, train_steps, offset)
}

impl Scheduler for DdimScheduler {
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
        _rng: &mut TorchGenerator,
    ) -> ArrayD<f32> {
        let t = self.train_timesteps[step_index];
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = match t.checked_sub(self.step_back) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), beta_t.sqrt());

        let (mut original, epsilon) = match self.prediction {
            PredictionType::Epsilon => (
                zip_map(sample, model_output, |x, eps| {
                    (x - sqrt_beta * eps) / sqrt_alpha
                }),
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                zip_map(sample, model_output, |x, x0| {
                    (x - sqrt_alpha * x0) / sqrt_beta
                }),
            ),
            PredictionType::VPrediction => (
                zip_map(sample, model_output, |x, v| sqrt_alpha * x - sqrt_beta * v),
                zip_map(sample, model_output, |x, v| sqrt_alpha * v + sqrt_beta * x),
            ),
        };
        if let Some(range) = self.clip_range {
            original.mapv_inplace(|x| x.clamp(-range, range));
        }

        // η = 0: the noise term vanishes, but diffusers still forms
        // 0 * sqrt(variance), which carries a NaN through if there is one.
        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = 0.0 * variance.sqrt();
        let direction = (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let sqrt_alpha_prev = alpha_prev.sqrt();
        zip_map(&original, &epsilon, |x0, eps| {
            sqrt_alpha_prev * x0 + direction * eps
        })
    }
}
