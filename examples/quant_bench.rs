//! Load time, run time and peak memory of one ONNX component, for comparing
//! float32, int8 and float16 files of the same model (docs/benchmarks.md).
//!
//!     cargo run --release --example quant_bench -- MODEL.onnx [--latent 64] [--runs 3] [--threads 2] [--f16 native|f32]
//!
//! Inputs are filled by name (random normal values, fixed seed): `sample` /
//! `latent_sample` [1, 4, latent, latent], `timestep` 500, `encoder_hidden_states`
//! [1, 77, width], `input_ids` [1, 77], `timestep_cond` [1, width]. Run one
//! file per process: peak RSS (VmHWM) is per process. Prints one JSON line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use edgegen::engine::{self, F16Mode, Input, OnnxModel, TensorSpec};
use ndarray::{ArrayD, IxDyn};

struct Options {
    model: PathBuf,
    latent: usize,
    runs: usize,
    threads: usize,
    f16: F16Mode,
}

fn parse_options() -> Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        model: PathBuf::new(),
        latent: 64,
        runs: 3,
        threads: 0,
        f16: F16Mode::for_this_cpu(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--latent" => options.latent = value()?.parse()?,
            "--runs" => options.runs = value()?.parse()?,
            "--threads" => options.threads = value()?.parse()?,
            "--f16" => {
                options.f16 = match value()?.as_str() {
                    "native" => F16Mode::Native,
                    "f32" => F16Mode::Float32,
                    other => bail!("--f16 takes native or f32, not {other}"),
                }
            }
            _ if options.model.as_os_str().is_empty() => options.model = PathBuf::from(arg),
            _ => bail!("unexpected argument {arg}"),
        }
    }
    if options.model.as_os_str().is_empty() {
        bail!("usage: quant_bench MODEL.onnx [--latent N] [--runs N] [--threads N] [--f16 native|f32]");
    }
    Ok(options)
}

/// Memory figures of this process from /proc/self/status, in MB.
fn status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Deterministic pseudo-normal values (sum of uniforms), enough for timing.
fn noise(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let count = shape.iter().product();
    let data = (0..count)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches data")
}

fn last_dim(spec: &TensorSpec, default: usize) -> usize {
    spec.shape
        .as_ref()
        .and_then(|s| s.last().copied().flatten())
        .unwrap_or(default)
}

fn input_for(spec: &TensorSpec, latent: usize) -> Result<Input> {
    Ok(match spec.name.as_str() {
        "sample" | "latent_sample" => Input::Float(noise(&[1, 4, latent, latent], 1)),
        "timestep" => Input::Float(ArrayD::from_elem(IxDyn(&[1]), 500.0)),
        "encoder_hidden_states" => Input::Float(noise(&[1, 77, last_dim(spec, 1024)], 2)),
        "timestep_cond" => Input::Float(noise(&[1, last_dim(spec, 256)], 3)),
        "input_ids" => Input::Int(ArrayD::from_shape_fn(IxDyn(&[1, 77]), |i| {
            (i[1] as i64 * 7) % 1000
        })),
        other => bail!("no filler for input '{other}'"),
    })
}

fn main() -> Result<()> {
    env_logger::init();
    let options = parse_options()?;
    engine::set_threads(options.threads);
    let rss_start = status_mb("VmRSS:");
    let started = Instant::now();
    let model = OnnxModel::load_with(&options.model, options.f16)?;
    let load_s = started.elapsed().as_secs_f64();
    let rss_loaded = status_mb("VmRSS:");
    let inputs = || -> Result<Vec<(String, Input)>> {
        model
            .inputs()
            .iter()
            .map(|spec| Ok((spec.name.clone(), input_for(spec, options.latent)?)))
            .collect()
    };
    let run = || -> Result<f64> {
        let values = inputs()?;
        let started = Instant::now();
        model.run(
            values
                .iter()
                .map(|(n, v)| (n.as_str(), v.clone()))
                .collect(),
        )?;
        Ok(started.elapsed().as_secs_f64())
    };
    let first_s = run()?; // includes optimizing for these shapes
    let rss_optimized = status_mb("VmRSS:");
    let mut times: Vec<f64> = (0..options.runs).map(|_| run()).collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    let median_s = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{{\"model\": {:?}, \"format\": {:?}, \"f16_mode\": \"{:?}\", \"latent\": {}, \"threads\": {}, \
         \"load_s\": {load_s:.2}, \"first_run_s\": {first_s:.2}, \"median_run_s\": {median_s:.3}, \
         \"rss_start_mb\": {rss_start:.0}, \"rss_loaded_mb\": {rss_loaded:.0}, \"rss_optimized_mb\": {rss_optimized:.0}, \
         \"peak_rss_mb\": {:.0}}}",
        options.model.display().to_string(),
        model.summary().quantization(),
        options.f16,
        options.latent,
        options.threads,
        status_mb("VmHWM:")
    );
    Ok(())
}
