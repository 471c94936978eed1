//! Euler ancestral sampler: diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! Every step, including the last, draws `randn(model_output.shape)` from
//! the generator after the deterministic Euler move (on the last step the
//! noise is scaled by zero but still drawn, which keeps later draws aligned).

use anyhow::bail;
use ndarray::ArrayD;

use super::euler::{predict_original, scale_by_sigma, SigmaSchedule};
use super::{zip_map, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::rng::TorchGenerator;

pub(crate) struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        let prediction = PredictionType::parse(config)?;
        if prediction == PredictionType::Sample {
            // diffusers raises NotImplementedError for this combination.
            bail!("prediction_type \"sample\" is not supported by Euler ancestral");
        }
        // The class has no Karras, exponential, beta or final-sigma options:
        // diffusers drops those keys when building it from another config.
        let own_config = SchedulerConfig {
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: None,
            ..config.clone()
        };
        let schedule = SigmaSchedule::new(&own_config, steps, TimestepSpacing::Linspace)?;
        Ok(Self {
            timesteps: schedule.timesteps,
            sigmas: schedule.sigmas,
            init_noise_sigma: schedule.init_noise_sigma,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: ArrayD<f32>, step_index: usize) -> ArrayD<f32> {
        scale_by_sigma(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &ArrayD<f32>,
        step_index: usize,
        sample: &ArrayD<f32>,
        rng: &mut TorchGenerator,
    ) -> ArrayD<f32> {
        let sigma_from = self.sigmas[step_index];
        let sigma_to = self.sigmas[step_index + 1];
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma_from;

        let denoised = predict_original(self.prediction, model_output, sample, sigma_from);
        let moved = zip_map(sample, &denoised, |x, x0| {
            let derivative = (x - x0) / sigma_from;
            x + derivative * dt
        });
        let noise = rng.randn(model_output.shape());
        zip_map(&moved, &noise, |x, n| x + n * sigma_up)
    }
}
