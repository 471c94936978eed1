//! `edgegen bench`: time per component of a real generation, median of
//! several runs after a warm-up, plus load and first-run (optimize) cost and
//! peak memory.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;

use crate::commands::{load_pipeline, open_model};
use crate::config::Config;
use crate::pipeline::{millis, Timings};
use crate::request::Request;

/// What to benchmark: a request (model, size, steps…) and how many runs.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub request: Request,
    pub runs: usize,
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub model: String,
    pub threads: usize,
    pub load_ms: f64,
    pub first_run_ms: f64,
    pub median: Timings,
    pub steps: u32,
    pub size: (u32, u32),
    pub peak_rss_bytes: Option<u64>,
}

pub fn run(config: &Config, spec: &BenchSpec) -> Result<BenchReport> {
    let bundle = open_model(config, spec.request.model.as_deref())?;
    let loading = Instant::now();
    let pipeline = load_pipeline(config, &bundle)?;
    let load_ms = millis(loading.elapsed());
    let mut request = spec.request.clone();
    request.seed = Some(request.seed.unwrap_or(0));
    let settings = pipeline.resolve(&request, &config.limits)?;
    let first = Instant::now();
    pipeline.generate(&settings, &mut |_, _| true)?;
    let first_run_ms = millis(first.elapsed());
    let mut runs = Vec::with_capacity(spec.runs.max(1));
    for _ in 0..spec.runs.max(1) {
        runs.push(pipeline.generate(&settings, &mut |_, _| true)?.timings);
    }
    Ok(BenchReport {
        model: bundle.id.clone(),
        threads: effective_threads(config.engine.threads),
        load_ms,
        first_run_ms,
        median: median_timings(&runs),
        steps: settings.steps,
        size: (settings.width, settings.height),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

fn effective_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

fn median_timings(runs: &[Timings]) -> Timings {
    let column = |pick: fn(&Timings) -> Option<f64>| median(runs.iter().filter_map(pick).collect());
    Timings {
        text_encoder_ms: column(|t| t.text_encoder_ms),
        unet_ms: column(|t| t.unet_ms),
        vae_decoder_ms: column(|t| t.vae_decoder_ms),
        generator_ms: column(|t| t.generator_ms),
        total_ms: column(|t| Some(t.total_ms)).unwrap_or(0.0),
    }
}

/// Peak resident memory of this process (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let (w, h) = self.size;
        let _ = writeln!(
            out,
            "model {}  {w}x{h}  {} steps  {} threads",
            self.model, self.steps, self.threads
        );
        let _ = writeln!(out, "{:<16} {:>12}", "component", "median ms");
        let rows = [
            ("text encoder", self.median.text_encoder_ms),
            ("unet (all steps)", self.median.unet_ms),
            (
                "unet per step",
                self.median
                    .unet_ms
                    .map(|u| u / f64::from(self.steps.max(1))),
            ),
            ("vae decoder", self.median.vae_decoder_ms),
            ("generator", self.median.generator_ms),
            ("total", Some(self.median.total_ms)),
        ];
        for (name, value) in rows {
            if let Some(value) = value {
                let _ = writeln!(out, "{name:<16} {value:>12.2}");
            }
        }
        let _ = writeln!(
            out,
            "load {:.1} ms, first run (incl. optimize) {:.1} ms",
            self.load_ms, self.first_run_ms
        );
        if let Some(rss) = self.peak_rss_bytes {
            let _ = writeln!(out, "peak RSS {:.1} MB", rss as f64 / 1_048_576.0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(4.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn rss_is_read() {
        assert!(peak_rss_bytes().unwrap_or(1) > 0);
    }
}
