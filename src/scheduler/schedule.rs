//! The training noise schedule and the numpy/torch numerics diffusers builds
//! inference schedules with, reproduced operation for operation.
//!
//! Precision matters here: diffusers computes betas and cumulative alphas
//! with torch in float32, derives sigmas with numpy (float64 where numpy
//! promotes, float32 where it keeps torch's dtype), and the results decide
//! integer timesteps through rounding. Each helper names the diffusers or
//! numpy/torch expression it reproduces.

use anyhow::{bail, ensure};

use super::SchedulerConfig;

/// The diffusers class defaults that differ between scheduler classes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BetaDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
}

/// Euler, Euler ancestral, DDIM and DPM-Solver: `linear` from 1e-4 to 0.02.
pub(crate) const DDPM_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
};

/// The cumulative signal levels of the training schedule, ᾱ_t, as the
/// float32 tensor diffusers keeps in `alphas_cumprod`.
#[derive(Clone, Debug)]
pub(crate) struct NoiseSchedule {
    pub alphas_cumprod: Vec<f32>,
    /// `rescale_betas_zero_snr` was set.
    pub zero_terminal_snr: bool,
}

impl NoiseSchedule {
    /// `betas` … `alphas_cumprod` from a scheduler's `__init__`.
    pub fn from_config(config: &SchedulerConfig, defaults: BetaDefaults) -> anyhow::Result<Self> {
        let train_steps = config.num_train_timesteps.unwrap_or(1000);
        ensure!(
            train_steps >= 2,
            "num_train_timesteps must be at least 2, got {train_steps}"
        );
        let mut betas = match &config.trained_betas {
            Some(trained) => {
                ensure!(
                    trained.len() == train_steps,
                    "trained_betas has {} values but num_train_timesteps is {train_steps}",
                    trained.len()
                );
                trained.iter().map(|&b| b as f32).collect()
            }
            None => {
                let start = config.beta_start.unwrap_or(defaults.beta_start);
                let end = config.beta_end.unwrap_or(defaults.beta_end);
                let schedule = config
                    .beta_schedule
                    .as_deref()
                    .unwrap_or(defaults.beta_schedule);
                betas(schedule, start, end, train_steps)?
            }
        };
        let zero_terminal_snr = config.rescale_betas_zero_snr.unwrap_or(false);
        if zero_terminal_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
        Ok(Self {
            alphas_cumprod: torch_cumprod(&alphas),
            zero_terminal_snr,
        })
    }

    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Euler and DPM-Solver overwrite the last ᾱ with 2⁻²⁴ under zero
    /// terminal SNR so that its sigma stays finite; DDIM and LCM do not.
    pub fn with_finite_terminal_sigma(mut self) -> Self {
        if self.zero_terminal_snr {
            if let Some(last) = self.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        self
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, indexed by
    /// training timestep.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| sigma_of(a)).collect()
    }
}

/// σ for one ᾱ, in torch float32 arithmetic.
pub(crate) fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

fn betas(schedule: &str, start: f64, end: f64, train_steps: usize) -> anyhow::Result<Vec<f32>> {
    Ok(match schedule {
        "linear" => torch_linspace_f32(start, end, train_steps),
        "scaled_linear" => torch_linspace_f32(start.sqrt(), end.sqrt(), train_steps)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        "squaredcos_cap_v2" => cosine_betas(train_steps),
        other => bail!(
            "beta_schedule {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        ),
    })
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU: float32
/// `start + step * i` for the first half and `end - step * (steps - 1 - i)`
/// for the second. PyTorch's x86 (AVX2/AVX-512) and aarch64 builds contract
/// the multiply-add into one fused operation, hence `mul_add`.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `betas_for_alpha_bar(n)` with the cosine transform, computed in Python
/// floats and stored as float32.
fn cosine_betas(train_steps: usize) -> Vec<f32> {
    const MAX_BETA: f64 = 0.999;
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..train_steps)
        .map(|i| {
            let t1 = i as f64 / train_steps as f64;
            let t2 = (i + 1) as f64 / train_steps as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA) as f32
        })
        .collect()
}

/// `torch.cumprod` on a float32 CPU tensor: the running product is kept in
/// double precision and each output rounded to float32.
fn torch_cumprod(values: &[f32]) -> Vec<f32> {
    let mut product = 1.0f64;
    values
        .iter()
        .map(|&v| {
            product *= f64::from(v);
            product as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr(betas)` (Lin et al. 2023, algorithm 1) in
/// float32 torch arithmetic.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = torch_cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for value in &mut sqrt_bar {
        *value -= last;
        *value *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut rescaled = Vec::with_capacity(bar.len());
    rescaled.push(1.0 - bar[0]);
    rescaled.extend(bar.windows(2).map(|pair| 1.0 - pair[1] / pair[0]));
    rescaled
}

/// Integer training timesteps (as numpy produced them, in float64) checked
/// to index the training schedule; diffusers would index out of range or
/// wrap around with a negative index instead.
pub(crate) fn checked_train_timesteps(
    timesteps: &[f64],
    train_steps: usize,
    offset: usize,
) -> anyhow::Result<Vec<usize>> {
    timesteps
        .iter()
        .map(|&t| {
            ensure!(
                t >= 0.0 && t < train_steps as f64,
                "timestep {t} (steps_offset {offset}) is outside the {train_steps} training timesteps"
            );
            Ok(t as usize)
        })
        .collect()
}

/// `np.linspace(start, stop, num)` (endpoint included): `i * step + start`
/// in float64, the last element set to `stop` exactly.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    np_linspace_impl(start, stop, num, true)
}

/// `np.linspace(start, stop, num, endpoint=False)`.
pub(crate) fn np_linspace_open(start: f64, stop: f64, num: usize) -> Vec<f64> {
    np_linspace_impl(start, stop, num, false)
}

fn np_linspace_impl(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut values: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        (0..num).map(|i| i as f64 * step + start).collect()
    } else {
        // numpy leaves the step undefined and yields `start`.
        (0..num).map(|i| i as f64 * delta + start).collect()
    };
    if endpoint && num > 1 {
        values[num - 1] = stop;
    }
    values
}

/// `np.arange(start, stop, step)` for float steps: numpy computes the length
/// as `ceil((stop - start) / step)` and fills `start + i * delta` where
/// `delta = (start + step) - start`, which is not always `step`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: halves go to the even neighbour.
pub(crate) fn np_round(value: f64) -> f64 {
    value.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for x inside the table.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return f64::from(fp[j]);
    }
    let slope = f64::from(fp[j + 1]) - f64::from(fp[j]);
    slope * (x - j as f64) + f64::from(fp[j])
}

/// `_convert_to_karras`: Karras et al. (2022) noise levels with ρ = 7,
/// from `sigma_max` down to `sigma_min`, in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// `_sigma_to_t`: the fractional training timestep whose log-sigma matches,
/// interpolating linearly in log-sigma. `log_sigmas` is `np.log` of the
/// float32 training sigmas (so float32 itself).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_at_or_below = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0);
    let low_idx = last_at_or_below.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `np.log` of float32 sigmas. numpy's float32 log on x86 uses a SIMD
/// polynomial that can differ from the correctly rounded value by one ulp;
/// libm's (what numpy uses on aarch64) is taken here.
pub(crate) fn log_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| v.ln()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_matches_numpy_fill_rule() {
        // np.arange(1000, 0, -1000/7).tolist()
        let expected = [
            1000.0,
            857.1428571428571,
            714.2857142857142,
            571.4285714285713,
            428.57142857142844,
            285.71428571428555,
            142.85714285714266,
        ];
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0), expected);
    }

    #[test]
    fn linspace_single_point_is_start() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 2), vec![0.0, 999.0]);
    }

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!(np_round(937.5), 938.0);
        assert_eq!(np_round(812.5), 812.0);
    }
}
