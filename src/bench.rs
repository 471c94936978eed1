//! `edgegen bench`: time per component of a real generation, median of
//! several runs after a warm-up, plus load and first-run (optimize) cost and
//! peak memory; or the same figures for one lone ONNX file fed with
//! deterministic inputs of given shapes (`run_onnx`), which
//! `tools/bench_vs_ort.py` compares with onnxruntime on the very same file.
//!
//! Peak memory is the process's `VmHWM`: measure one thing per process.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use serde::Serialize;

use crate::bundle::Bundle;
use crate::commands::{load_pipeline, open_model};
use crate::config::{Config, MemoryMode};
use crate::engine::{self, ElementType, Input, MatrixPath, ModelOptions, OnnxModel};
use crate::pipeline::{millis, Timings};
use crate::request::Request;

/// Component graphs a bundle may hold, as `<component>/model.onnx`.
const COMPONENTS: &[&str] = &["text_encoder", "unet", "vae_decoder", "generator"];

/// What to benchmark: a request (model, size, steps…) and how many runs.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub request: Request,
    pub runs: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub threads: usize,
    /// `engine.memory`: resident keeps every component loaded, sequential
    /// loads, runs and drops one at a time (also in `load_ms`/`first_run_ms`).
    pub memory: MemoryMode,
    pub load_ms: f64,
    pub first_run_ms: f64,
    pub median: Timings,
    pub steps: u32,
    pub size: (u32, u32),
    /// Resident memory before loading (the binary itself).
    pub rss_before_load_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    /// Weight bytes of each component graph, read after the peak was taken.
    pub component_weight_bytes: Vec<(String, u64)>,
}

impl BenchReport {
    /// The largest component's weights: the floor of sequential mode's peak.
    pub fn largest_component_bytes(&self) -> Option<u64> {
        self.component_weight_bytes.iter().map(|(_, b)| *b).max()
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("serializing the bench report")
    }
}

pub fn run(config: &Config, spec: &BenchSpec) -> Result<BenchReport> {
    let bundle = open_model(config, spec.request.model.as_deref())?;
    let rss_before_load_bytes = current_rss_bytes();
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
    let peak_rss_bytes = peak_rss_bytes();
    drop(pipeline);
    Ok(BenchReport {
        model: bundle.id.clone(),
        threads: effective_threads(config.engine.threads),
        memory: config.engine.memory,
        load_ms,
        first_run_ms,
        median: median_timings(&runs),
        steps: settings.steps,
        size: (settings.width, settings.height),
        rss_before_load_bytes,
        peak_rss_bytes,
        component_weight_bytes: component_weight_bytes(&bundle)?,
    })
}

fn component_weight_bytes(bundle: &Bundle) -> Result<Vec<(String, u64)>> {
    let mut sizes = Vec::new();
    for component in COMPONENTS {
        let path = bundle.path(&format!("{component}/model.onnx"));
        if path.is_file() {
            sizes.push((component.to_string(), engine::weight_bytes(&path)?));
        }
    }
    Ok(sizes)
}

/// `resident` or `sequential`, as `engine.memory` takes them.
pub fn parse_memory_mode(text: &str) -> Result<MemoryMode> {
    match text {
        "resident" => Ok(MemoryMode::Resident),
        "sequential" => Ok(MemoryMode::Sequential),
        other => bail!("memory mode '{other}': expected resident or sequential"),
    }
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
    proc_status_bytes("VmHWM:")
}

/// Resident memory of this process now (`VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let (w, h) = self.size;
        let _ = writeln!(
            out,
            "model {}  {w}x{h}  {} steps  {} threads  memory {:?}",
            self.model, self.steps, self.threads, self.memory
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
            let before = self.rss_before_load_bytes.map_or(String::new(), |b| {
                format!(" (before loading {:.1} MB)", mib(b))
            });
            let _ = writeln!(out, "peak RSS {:.1} MB{before}", mib(rss));
        }
        for (component, bytes) in &self.component_weight_bytes {
            let _ = writeln!(out, "{component} weights {:.1} MB", mib(*bytes));
        }
        if let (Some(rss), Some(largest)) = (self.peak_rss_bytes, self.largest_component_bytes()) {
            if largest > 0 {
                let _ = writeln!(
                    out,
                    "peak RSS / largest component's weights {:.2}",
                    rss as f64 / largest as f64
                );
            }
        }
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// One graph input to feed: `NAME=SHAPE[:DTYPE[:RANGE]]`, e.g.
/// `sample=1x4x64x64`, `timestep=scalar`, `input_ids=1x77:i32:49408`.
/// SHAPE is `x`-separated sizes or `scalar`; DTYPE (f32, f16, i32, i64)
/// defaults to what the graph declares; integer inputs take values in
/// [0, RANGE) (default 1000: a token id or class index valid for the
/// bundled models), float inputs values in [-1, 1).
#[derive(Clone, Debug, PartialEq)]
pub struct InputFill {
    pub name: String,
    pub shape: Vec<usize>,
    pub element: Option<ElementType>,
    pub int_range: u64,
}

const DEFAULT_INT_RANGE: u64 = 1000;

impl FromStr for InputFill {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let usage = || {
            format!("input '{text}': expected NAME=SHAPE[:DTYPE[:RANGE]], e.g. sample=1x4x64x64")
        };
        let (name, rest) = text.split_once('=').with_context(usage)?;
        if name.is_empty() {
            bail!(usage());
        }
        let mut parts = rest.split(':');
        let shape = parse_shape(parts.next().unwrap_or_default()).with_context(usage)?;
        let element = match parts.next() {
            None => None,
            Some(dtype) => Some(parse_element(dtype).with_context(usage)?),
        };
        let int_range = match parts.next() {
            None => DEFAULT_INT_RANGE,
            Some(range) => range
                .parse::<u64>()
                .ok()
                .filter(|&r| r > 0)
                .with_context(|| format!("range '{range}' is not a positive integer"))
                .with_context(usage)?,
        };
        if parts.next().is_some() {
            bail!(usage());
        }
        Ok(InputFill {
            name: name.to_string(),
            shape,
            element,
            int_range,
        })
    }
}

fn parse_shape(text: &str) -> Result<Vec<usize>> {
    if text == "scalar" {
        return Ok(Vec::new());
    }
    text.split('x')
        .map(|d| {
            d.parse::<usize>()
                .map_err(|_| anyhow!("'{d}' is not a size in shape '{text}'"))
        })
        .collect()
}

fn parse_element(text: &str) -> Result<ElementType> {
    Ok(match text {
        "f32" | "float32" => ElementType::F32,
        "f16" | "float16" => ElementType::F16,
        "i32" | "int32" => ElementType::I32,
        "i64" | "int64" => ElementType::I64,
        other => bail!("dtype '{other}': expected f32, f16, i32 or i64"),
    })
}

/// splitmix64: the deterministic value stream both this module and
/// `tools/bench_vs_ort.py` draw inputs from, so both engines get the same bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of the input's name: each input draws its own stream.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl InputFill {
    fn hashes(&self) -> impl Iterator<Item = u64> {
        let seed = name_seed(&self.name);
        let count: usize = self.shape.iter().product();
        (0..count as u64).map(move |i| splitmix64(seed.wrapping_add(i)))
    }

    /// The values `tools/bench_vs_ort.py` computes for the same spec: floats
    /// are 24 random bits scaled exactly to [-1, 1).
    pub fn value(&self, declared: ElementType) -> Result<Input> {
        let shape = IxDyn(&self.shape);
        let wrong_count = |e| anyhow!("input '{}': {e}", self.name);
        Ok(match self.element.unwrap_or(declared) {
            ElementType::I32 | ElementType::I64 => {
                let range = self.int_range;
                let data = self.hashes().map(|h| ((h >> 11) % range) as i64).collect();
                Input::Int(ArrayD::from_shape_vec(shape, data).map_err(wrong_count)?)
            }
            _ => {
                let data = self
                    .hashes()
                    .map(|h| (h >> 40) as f32 * (2.0 / 16_777_216.0) - 1.0)
                    .collect();
                Input::Float(ArrayD::from_shape_vec(shape, data).map_err(wrong_count)?)
            }
        })
    }
}

/// What `run_onnx` measures: one file, fixed input shapes, a thread count.
#[derive(Clone, Debug)]
pub struct OnnxBenchSpec {
    pub path: PathBuf,
    pub inputs: Vec<InputFill>,
    /// 0: every core.
    pub threads: usize,
    /// Timed runs after the first (warm-up) run.
    pub runs: usize,
    /// Where to write each output as raw little-endian f32 (`output<i>.f32`).
    pub save_outputs: Option<PathBuf>,
    /// Compile cache directory; `None`: none.
    pub cache_dir: Option<PathBuf>,
    /// See `engine::ModelOptions::attention_slice_bytes`.
    pub attention_slice_bytes: Option<usize>,
    /// See `engine::ModelOptions::matrix_path`.
    pub matrix_path: MatrixPath,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OnnxBenchReport {
    pub model: PathBuf,
    pub engine: &'static str,
    pub threads: usize,
    pub inputs: Vec<TensorInfo>,
    /// `off`, `cold` (the model was not in the compile cache) or `warm`.
    pub cache: &'static str,
    /// Parsing the file into a graph (warm: reading its cached description).
    pub load_ms: f64,
    /// Fixing the shapes, optimizing and building the runnable plan.
    pub optimize_ms: f64,
    /// The first run on the optimized plan (also the warm-up).
    pub first_run_ms: f64,
    pub median_ms: f64,
    pub runs_ms: Vec<f64>,
    /// Resident memory before loading (the binary itself).
    pub rss_before_load_bytes: Option<u64>,
    /// Peak resident memory once the plan is built, before the first run.
    pub optimized_peak_rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    pub outputs: Vec<TensorInfo>,
}

impl OnnxBenchReport {
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("serializing the bench report")
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let inputs: Vec<String> = self
            .inputs
            .iter()
            .map(|i| format!("{}={:?}", i.name, i.shape))
            .collect();
        let _ = writeln!(
            out,
            "{}  {}  {} threads",
            self.model.display(),
            inputs.join(" "),
            self.threads
        );
        let _ = writeln!(
            out,
            "load {:.1} ms, optimize {:.1} ms, first run {:.1} ms (compile cache: {})",
            self.load_ms, self.optimize_ms, self.first_run_ms, self.cache
        );
        let _ = writeln!(
            out,
            "median of {} runs {:.2} ms",
            self.runs_ms.len(),
            self.median_ms
        );
        if let Some(rss) = self.peak_rss_bytes {
            let _ = writeln!(out, "peak RSS {:.1} MB", mib(rss));
        }
        out
    }
}

/// Loads one ONNX file, optimizes it for the given input shapes and times it.
pub fn run_onnx(spec: &OnnxBenchSpec) -> Result<OnnxBenchReport> {
    engine::set_threads(spec.threads);
    let rss_before_load_bytes = current_rss_bytes();
    let loading = Instant::now();
    let options = ModelOptions {
        cache_dir: spec.cache_dir.clone(),
        attention_slice_bytes: spec.attention_slice_bytes,
        matrix_path: spec.matrix_path,
        ..ModelOptions::default()
    };
    let model = OnnxModel::open(&spec.path, &options)?;
    let load_ms = millis(loading.elapsed());
    let cache = model.cache_use().name();
    let (inputs, infos) = onnx_inputs(&model, &spec.inputs)?;
    let feed = || -> Vec<(&str, Input)> {
        inputs
            .iter()
            .map(|(name, value)| (name.as_str(), value.clone()))
            .collect()
    };
    let optimizing = Instant::now();
    model.prepare(feed())?;
    let optimize_ms = millis(optimizing.elapsed());
    let optimized_peak_rss_bytes = peak_rss_bytes();
    let first = Instant::now();
    let outputs = model.run(feed())?;
    let first_run_ms = millis(first.elapsed());
    let mut runs_ms = Vec::with_capacity(spec.runs.max(1));
    for _ in 0..spec.runs.max(1) {
        let values = feed();
        let started = Instant::now();
        model.run(values)?;
        runs_ms.push(millis(started.elapsed()));
    }
    let peak_rss_bytes = peak_rss_bytes();
    let outputs = describe_outputs(&model, &outputs, spec.save_outputs.as_deref())?;
    Ok(OnnxBenchReport {
        model: spec.path.clone(),
        engine: "tract",
        threads: effective_threads(spec.threads),
        inputs: infos,
        cache,
        load_ms,
        optimize_ms,
        first_run_ms,
        median_ms: median(runs_ms.clone()).unwrap_or(0.0),
        runs_ms,
        rss_before_load_bytes,
        optimized_peak_rss_bytes,
        peak_rss_bytes,
        outputs,
    })
}

type NamedInputs = Vec<(String, Input)>;

/// The values for every graph input, in graph order; each needs a fill.
fn onnx_inputs(model: &OnnxModel, fills: &[InputFill]) -> Result<(NamedInputs, Vec<TensorInfo>)> {
    let mut inputs = Vec::new();
    let mut infos = Vec::new();
    for spec in model.inputs() {
        let fill = fills
            .iter()
            .find(|f| f.name == spec.name)
            .with_context(|| {
                let declared: Vec<String> = model.inputs().iter().map(|s| s.to_string()).collect();
                format!(
                    "{}: no --input for '{}' (the graph takes: {})",
                    model.path().display(),
                    spec.name,
                    declared.join("; ")
                )
            })?;
        let element = fill.element.unwrap_or(spec.element);
        inputs.push((spec.name.clone(), fill.value(spec.element)?));
        infos.push(TensorInfo {
            name: spec.name.clone(),
            shape: fill.shape.clone(),
            dtype: Some(element.to_string()),
            file: None,
        });
    }
    if let Some(extra) = fills.iter().find(|f| model.input(&f.name).is_none()) {
        bail!(
            "{}: the graph has no input '{}'",
            model.path().display(),
            extra.name
        );
    }
    Ok((inputs, infos))
}

fn describe_outputs(
    model: &OnnxModel,
    outputs: &[ArrayD<f32>],
    save_dir: Option<&Path>,
) -> Result<Vec<TensorInfo>> {
    let mut infos = Vec::new();
    for (ix, (name, value)) in model.outputs().iter().zip(outputs).enumerate() {
        let file = match save_dir {
            Some(dir) => Some(save_raw_f32(dir, ix, value)?),
            None => None,
        };
        infos.push(TensorInfo {
            name: name.clone(),
            shape: value.shape().to_vec(),
            dtype: Some("float32".into()),
            file,
        });
    }
    Ok(infos)
}

/// Raw little-endian f32 in row-major order (`numpy.fromfile(f, "<f4")`).
fn save_raw_f32(dir: &Path, index: usize, value: &ArrayD<f32>) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("output{index}.f32"));
    let bytes: Vec<u8> = value.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
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
    fn input_fills_parse() -> Result<()> {
        let fill: InputFill = "sample=1x4x64x64".parse()?;
        assert_eq!(fill.shape, vec![1, 4, 64, 64]);
        assert_eq!(fill.element, None);
        let fill: InputFill = "timestep=scalar:f32".parse()?;
        assert!(fill.shape.is_empty());
        assert_eq!(fill.element, Some(ElementType::F32));
        let fill: InputFill = "input_ids=1x77:i32:49408".parse()?;
        assert_eq!(fill.int_range, 49408);
        for bad in [
            "sample",
            "=1x4",
            "s=1xa",
            "s=1:f8",
            "s=1:i64:0",
            "s=1:i64:5:6",
        ] {
            assert!(bad.parse::<InputFill>().is_err(), "{bad} should not parse");
        }
        Ok(())
    }

    /// The reference values come from tools/bench_vs_ort.py's numpy code
    /// (and splitmix64's published first output for seed 0): both engines
    /// must see bit-identical inputs, so the match is exact.
    #[test]
    fn fills_match_the_python_generator() -> Result<()> {
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let fill: InputFill = "sample=3".parse()?;
        let Input::Float(values) = fill.value(ElementType::F32)? else {
            bail!("float input expected");
        };
        // Shortest decimals of the exact f32 values (numpy's float32 repr).
        let want = [0.481_401_56_f32, 0.970_941_07, -0.064_936_88];
        assert_eq!(values.as_slice(), Some(&want[..]));
        let fill: InputFill = "input_ids=3:i64:49408".parse()?;
        let Input::Int(values) = fill.value(ElementType::F32)? else {
            bail!("int input expected");
        };
        assert_eq!(values.as_slice(), Some(&[1729_i64, 49125, 18278][..]));
        Ok(())
    }

    #[test]
    fn rss_is_read() {
        assert!(peak_rss_bytes().unwrap_or(1) > 0);
    }
}
