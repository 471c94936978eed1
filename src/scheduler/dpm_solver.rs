//! DPM-Solver++(2M): diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"` and `solver_order = 2` (what the name
//! "DPM++ 2M" denotes), with or without Karras sigmas. Deterministic: no
//! noise is drawn.

use anyhow::bail;
use ndarray::ArrayD;

use super::schedule::{self, NoiseSchedule, DDPM_BETAS};
use super::{
    reject_enabled, zip_map, FinalSigma, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};
use crate::rng::TorchGenerator;

/// How the second-order step combines the last two model outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(crate) struct DpmSolverScheduler {
    timesteps: Vec<f64>,
    /// One per timestep plus the final one, float32 as diffusers keeps them.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    solver_type: SolverType,
    /// Whether the last step falls back to first order (diffusers'
    /// `lower_order_final` condition, decided once the schedule is known).
    first_order_last_step: bool,
    /// The previous step's denoised estimate, for the second-order update.
    previous_denoised: Option<ArrayD<f32>>,
}

impl DpmSolverScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize, karras: bool) -> anyhow::Result<Self> {
        reject_enabled(&[
            ("thresholding", config.thresholding),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("use_lu_lambdas", config.use_lu_lambdas),
            ("use_flow_sigmas", config.use_flow_sigmas),
        ])?;
        if let Some(variance) = &config.variance_type {
            bail!("variance_type {variance:?} is not supported");
        }
        let solver_type = match config.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the UniPC / DEIS solver names onto midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => bail!("solver_type {other:?} is not supported (midpoint, heun)"),
        };
        let final_sigma = FinalSigma::parse(config)?;
        let schedule = NoiseSchedule::from_config(config, DDPM_BETAS)?.with_finite_terminal_sigma();
        let train_sigmas = schedule.sigmas();

        let (timesteps, mut sigmas) = if karras {
            karras_schedule(config, &train_sigmas, steps)
        } else {
            let last_timestep = unclipped_timesteps(config, &schedule);
            let timesteps = spaced_timesteps(config, schedule.train_steps(), last_timestep, steps)?;
            let sigmas = timesteps
                .iter()
                .map(|&t| schedule::np_interp(t, &train_sigmas) as f32)
                .collect();
            (timesteps, sigmas)
        };
        sigmas.push(match final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => train_sigmas[0],
        });

        let n = timesteps.len();
        let first_order_last_step = config.euler_at_final.unwrap_or(false)
            || (config.lower_order_final.unwrap_or(true) && n < 15)
            || final_sigma == FinalSigma::Zero;
        Ok(Self {
            timesteps,
            sigmas,
            prediction: PredictionType::parse(config)?,
            solver_type,
            first_order_last_step,
            previous_denoised: None,
        })
    }

    /// `convert_model_output` for DPM-Solver++: the denoised estimate x₀.
    fn denoised(
        &self,
        model_output: &ArrayD<f32>,
        sample: &ArrayD<f32>,
        step_index: usize,
    ) -> ArrayD<f32> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step_index]);
        match self.prediction {
            PredictionType::Epsilon => {
                zip_map(sample, model_output, |x, eps| (x - sigma * eps) / alpha)
            }
            PredictionType::VPrediction => {
                zip_map(sample, model_output, |x, v| alpha * x - sigma * v)
            }
            PredictionType::Sample => model_output.clone(),
        }
    }

    /// `dpm_solver_first_order_update` (DPM-Solver++ 1, i.e. DDIM).
    fn first_order(
        &self,
        denoised: &ArrayD<f32>,
        sample: &ArrayD<f32>,
        step_index: usize,
    ) -> ArrayD<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[step_index]);
        let h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s);
        let sample_coef = sigma_t / sigma_s;
        let denoised_coef = alpha_t * ((-h).exp() - 1.0);
        zip_map(sample, denoised, |x, d| sample_coef * x - denoised_coef * d)
    }

    /// `multistep_dpm_solver_second_order_update` for DPM-Solver++.
    fn second_order(
        &self,
        denoised: &ArrayD<f32>,
        previous: &ArrayD<f32>,
        sample: &ArrayD<f32>,
        step_index: usize,
    ) -> ArrayD<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step_index]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step_index - 1]);
        let lambda_t = log_snr(alpha_t, sigma_t);
        let lambda_s0 = log_snr(alpha_s0, sigma_s0);
        let lambda_s1 = log_snr(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let inv_r0 = 1.0 / (h_0 / h);
        let d1 = zip_map(denoised, previous, |m0, m1| inv_r0 * (m0 - m1));

        let sample_coef = sigma_t / sigma_s0;
        let d0_coef = alpha_t * ((-h).exp() - 1.0);
        let with_d0 = zip_map(sample, denoised, |x, d0| sample_coef * x - d0_coef * d0);
        match self.solver_type {
            SolverType::Midpoint => {
                let d1_coef = 0.5 * (alpha_t * ((-h).exp() - 1.0));
                zip_map(&with_d0, &d1, |x, d1| x - d1_coef * d1)
            }
            SolverType::Heun => {
                let d1_coef = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
                zip_map(&with_d0, &d1, |x, d1| x + d1_coef * d1)
            }
        }
    }
}

impl Scheduler for DpmSolverScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
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
        if step_index == 0 {
            self.previous_denoised = None;
        }
        let is_last = step_index + 1 == self.timesteps.len();
        let denoised = self.denoised(model_output, sample, step_index);
        let next = match self.previous_denoised.take() {
            Some(previous) if !(is_last && self.first_order_last_step) => {
                self.second_order(&denoised, &previous, sample, step_index)
            }
            _ => self.first_order(&denoised, sample, step_index),
        };
        self.previous_denoised = Some(denoised);
        next
    }
}

/// `_sigma_to_alpha_sigma_t`: the variance-preserving (α_t, σ_t) for a
/// variance-exploding sigma, in float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log(α) − log(σ), the half log signal-to-noise ratio.
fn log_snr(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `last_timestep` of `set_timesteps`: the training range left after
/// cutting off timesteps whose λ is below `lambda_min_clipped`.
fn unclipped_timesteps(config: &SchedulerConfig, schedule: &NoiseSchedule) -> usize {
    let lambda_min = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
    let clipped = schedule
        .alphas_cumprod
        .iter()
        .filter(|&&a| f64::from(log_snr(a.sqrt(), (1.0 - a).sqrt())) < lambda_min)
        .count();
    schedule.train_steps() - clipped
}

/// Timesteps for each spacing (`set_timesteps` without Karras sigmas).
fn spaced_timesteps(
    config: &SchedulerConfig,
    train_steps: usize,
    last_timestep: usize,
    steps: usize,
) -> anyhow::Result<Vec<f64>> {
    let offset = config.steps_offset.unwrap_or(0);
    Ok(
        match TimestepSpacing::parse(config, TimestepSpacing::Linspace)? {
            TimestepSpacing::Linspace => {
                let points = schedule::np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1);
                points[1..]
                    .iter()
                    .rev()
                    .map(|&t| schedule::np_round(t))
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train_steps as f64 / steps as f64;
                schedule::np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| schedule::np_round(t) - 1.0)
                    .collect()
            }
        },
    )
}

/// Karras sigmas over the whole training range and the timesteps they map
/// to, rounded (truncated for the cosine schedule, as diffusers does).
fn karras_schedule(
    config: &SchedulerConfig,
    train_sigmas: &[f32],
    steps: usize,
) -> (Vec<f64>, Vec<f32>) {
    let sigma_min = f64::from(train_sigmas[0]);
    let sigma_max = f64::from(train_sigmas[train_sigmas.len() - 1]);
    let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps);
    let log_sigmas = schedule::log_f32(train_sigmas);
    let round = config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
    let timesteps = sigmas
        .iter()
        .map(|&s| {
            let t = schedule::sigma_to_t(s, &log_sigmas);
            if round {
                schedule::np_round(t)
            } else {
                t.trunc()
            }
        })
        .collect();
    (timesteps, sigmas.into_iter().map(|s| s as f32).collect())
}
