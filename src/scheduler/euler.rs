//! Euler sampler: diffusers' `EulerDiscreteScheduler` (Karras et al. 2022,
//! algorithm 2 without churn, as diffusers' pipelines run it).

use anyhow::bail;
use ndarray::ArrayD;

use super::schedule::{self, NoiseSchedule, DDPM_BETAS};
use super::{
    reject_enabled, zip_map, FinalSigma, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};
use crate::rng::TorchGenerator;

pub(crate) struct EulerScheduler {
    timesteps: Vec<f64>,
    /// One per timestep plus the final one, float32 as diffusers keeps them.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        let sigmas = SigmaSchedule::new(config, steps, TimestepSpacing::Linspace)?;
        if config
            .interpolation_type
            .as_deref()
            .is_some_and(|t| t != "linear")
        {
            bail!(
                "interpolation_type {:?} is not supported (linear)",
                config.interpolation_type
            );
        }
        let prediction = PredictionType::parse(config)?;
        let continuous = match config.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => false,
            "continuous" => true,
            other => bail!("timestep_type {other:?} is not supported (discrete, continuous)"),
        };
        let timesteps = if continuous && prediction == PredictionType::VPrediction {
            // EDM-style conditioning: the UNet sees 0.25 * ln(sigma).
            sigmas.sigmas[..steps]
                .iter()
                .map(|s| f64::from(0.25 * s.ln()))
                .collect()
        } else {
            sigmas.timesteps
        };
        Ok(Self {
            timesteps,
            init_noise_sigma: sigmas.init_noise_sigma,
            sigmas: sigmas.sigmas,
            prediction,
        })
    }
}

impl Scheduler for EulerScheduler {
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
        _rng: &mut TorchGenerator,
    ) -> ArrayD<f32> {
        // Churn (s_churn) is 0 in diffusers' pipelines, so sigma_hat = sigma
        // and no noise is drawn.
        let sigma = self.sigmas[step_index];
        let dt = self.sigmas[step_index + 1] - sigma;
        let denoised = predict_original(self.prediction, model_output, sample, sigma);
        zip_map(sample, &denoised, |x, x0| {
            let derivative = (x - x0) / sigma;
            x + derivative * dt
        })
    }
}

/// Timesteps and sigmas shared by Euler and Euler ancestral.
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl SigmaSchedule {
    /// `EulerDiscreteScheduler.set_timesteps`. Euler ancestral's is the same
    /// without the Karras and final-sigma options (its config lacks them, so
    /// the caller clears them).
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        default_spacing: TimestepSpacing,
    ) -> anyhow::Result<Self> {
        reject_enabled(&[
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
        ])?;
        let schedule = NoiseSchedule::from_config(config, DDPM_BETAS)?.with_finite_terminal_sigma();
        let spacing = TimestepSpacing::parse(config, default_spacing)?;
        let train_steps = schedule.train_steps();
        let offset = config.steps_offset.unwrap_or(0);
        let mut timesteps = float_timesteps(spacing, train_steps, steps, offset);

        let train_sigmas = schedule.sigmas();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| schedule::np_interp(f64::from(t), &train_sigmas))
            .collect();
        if config.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = schedule::log_f32(&train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let last = match FinalSigma::parse(config)? {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => train_sigmas[0],
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(last);

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            sigmas,
            init_noise_sigma,
        })
    }
}

/// The Euler family's float32 timesteps for each spacing.
fn float_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    offset: usize,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, N - 1, steps, dtype=np.float32)[::-1]
            let mut t: Vec<f32> = schedule::np_linspace(0.0, (train_steps - 1) as f64, steps)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f32 + offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            schedule::np_arange(train_steps as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| schedule::np_round(v) as f32 - 1.0)
                .collect()
        }
    }
}

/// `sample / ((sigma**2 + 1) ** 0.5)`.
pub(crate) fn scale_by_sigma(sample: ArrayD<f32>, sigma: f32) -> ArrayD<f32> {
    let scale = (sigma * sigma + 1.0).sqrt();
    sample.mapv_into(|x| x / scale)
}

/// The denoised estimate x₀ from the model output at noise level `sigma`
/// (k-diffusion parameterisation), in diffusers' float32 operation order.
pub(crate) fn predict_original(
    prediction: PredictionType,
    model_output: &ArrayD<f32>,
    sample: &ArrayD<f32>,
    sigma: f32,
) -> ArrayD<f32> {
    match prediction {
        PredictionType::Epsilon => zip_map(sample, model_output, |x, eps| x - sigma * eps),
        PredictionType::VPrediction => {
            let variance = sigma * sigma + 1.0;
            let c_out = -sigma / variance.sqrt();
            zip_map(sample, model_output, |x, v| v * c_out + x / variance)
        }
        PredictionType::Sample => model_output.clone(),
    }
}
