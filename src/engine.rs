//! The only module that talks to tract: loading ONNX graphs, fixing their
//! shapes, optimizing them per shape and running them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use tract_linalg::multithread::Executor;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

mod aside;
mod attention;
mod cache;
#[cfg(feature = "cuda")]
mod cuda;
mod fold;
mod gemm_path;
pub mod kernels;
mod packed;
mod quant;

pub use cache::cache_reserve;
pub use gemm_path::MatrixPath;
pub use quant::F16Mode;

use cache::{CachedModel, ModelMeta, PlanCache, PlanKey};

/// Score tensors above this size are computed in slices no larger than it:
/// small enough that the scores stop setting the peak memory of a 512² UNet,
/// large enough that each slice's products stay big matrix products (at
/// 512², 32 MiB is about 400 query rows of five heads against 4096 keys).
pub const DEFAULT_ATTENTION_SLICE_BYTES: usize = 32 << 20;

/// tract turns small-channel 3×3 convolutions (input channels × taps ≤ 576,
/// e.g. TAESD's 64-channel layers) into its direct spatial convolution, whose
/// x86 kernel is 8 lanes wide; where AVX-512 is present, im2col feeding the
/// 16-lane matrix kernel is faster: TAESD's decoder at 512² takes 2.38 s
/// instead of 3.96 s on one core (docs/benchmarks.md). Set as tract's global
/// configuration, so `TRACT_DISABLE_DIRECT_SPATIAL` in the environment still
/// decides when given.
fn prefer_im2col_on_wide_vectors() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !has_avx512f() {
            return;
        }
        use tract_onnx::tract_core::knobs;
        match knobs::set_config_global("TRACT_DISABLE_DIRECT_SPATIAL", "true") {
            Ok(()) => log::debug!("AVX-512: convolutions run as im2col + matrix product"),
            Err(err) => log::warn!("could not prefer im2col convolutions: {err:#}"),
        }
    });
}

#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512f() -> bool {
    false
}

/// While alive, every allocation of 128 kB or more is its own mapping, given
/// back to the OS as soon as it is freed. Loading and optimizing a graph
/// copies its weights (read, then packed for the kernels); with glibc's
/// default, whose mmap threshold climbs to 32 MB after the first large free,
/// the copies land in the heap and freed ones stay resident: BK-SDM-Tiny's
/// UNet peaked at 1.55x its weights instead of 1.23x. Dropped, it leaves a
/// fixed 32 MB threshold (the default's ceiling), so the activations of later
/// runs reuse heap memory as before instead of faulting in fresh pages.
struct LoadingAllocator;

impl LoadingAllocator {
    fn new() -> LoadingAllocator {
        set_malloc_thresholds(128 * 1024);
        LoadingAllocator
    }
}

impl Drop for LoadingAllocator {
    fn drop(&mut self) {
        set_malloc_thresholds(32 * 1024 * 1024);
    }
}

/// The mmap threshold, and the heap trim threshold at twice it, as glibc's
/// own adjustment sets them: a trim threshold left at its 128 kB default
/// would hand the heap's top back after every run and fault it in again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_malloc_thresholds(mmap_bytes: i32) {
    // SAFETY: mallopt only changes glibc's allocation policy; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_bytes);
        libc::mallopt(libc::M_TRIM_THRESHOLD, mmap_bytes.saturating_mul(2));
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_thresholds(_mmap_bytes: i32) {}

/// Sets how many threads tract's matrix kernels use; 0 means every core.
pub fn set_threads(threads: usize) {
    let threads = if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    };
    let executor = if threads <= 1 {
        Executor::SingleThread
    } else {
        Executor::multithread(threads)
    };
    tract_linalg::multithread::set_default_executor(executor);
    gemm_path::set_threads(threads);
}

/// Element type of a graph input or output, as declared in the ONNX file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ElementType {
    F32,
    F16,
    I32,
    I64,
    Other,
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ElementType::F32 => "float32",
            ElementType::F16 => "float16",
            ElementType::I32 => "int32",
            ElementType::I64 => "int64",
            ElementType::Other => "other",
        };
        f.write_str(name)
    }
}

/// A graph input as the ONNX file declares it; `None` dims are symbolic.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub element: ElementType,
    pub shape: Option<Vec<Option<usize>>>,
}

impl TensorSpec {
    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.element)?;
        match &self.shape {
            None => write!(f, " [?]"),
            Some(dims) => {
                let dims: Vec<String> = dims
                    .iter()
                    .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                    .collect();
                write!(f, " [{}]", dims.join(", "))
            }
        }
    }
}

/// A value handed to a graph; the engine casts it to the declared type.
#[derive(Clone, Debug)]
pub enum Input {
    Float(ArrayD<f32>),
    Int(ArrayD<i64>),
}

impl Input {
    /// A batch of one repeated value becomes that one value (a `[batch]`
    /// timestep fed to a graph that takes a scalar).
    fn collapse_repeated(self) -> Input {
        fn first_if_all_equal<T: Copy + PartialEq>(a: &ArrayD<T>) -> Option<T> {
            let first = *a.iter().next()?;
            a.iter().all(|&v| v == first).then_some(first)
        }
        match &self {
            Input::Float(a) => match first_if_all_equal(a) {
                Some(v) => Input::Float(ArrayD::from_elem(IxDyn(&[1]), v)),
                None => self,
            },
            Input::Int(a) => match first_if_all_equal(a) {
                Some(v) => Input::Int(ArrayD::from_elem(IxDyn(&[1]), v)),
                None => self,
            },
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Input::Float(a) => a.shape(),
            Input::Int(a) => a.shape(),
        }
    }
}

/// What the ONNX file holds that matters for quantization reports.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GraphSummary {
    /// Operator types that only appear in quantized graphs, with counts.
    pub quantized_ops: BTreeMap<String, usize>,
    /// Weight element types (initializers), with total element counts.
    pub weight_types: BTreeMap<String, usize>,
    pub node_count: usize,
}

impl GraphSummary {
    /// "f32", "f16", "int8 (QDQ)", "int8 (dynamic)", … — the weight format in one word.
    pub fn quantization(&self) -> String {
        let has = |op: &str| self.quantized_ops.contains_key(op);
        if has("DynamicQuantizeLinear") || has("MatMulInteger") || has("ConvInteger") {
            return "int8 (dynamic)".into();
        }
        if has("QLinearConv") || has("QLinearMatMul") {
            return "int8 (QOperator)".into();
        }
        if has("DequantizeLinear") {
            return "int8 (QDQ)".into();
        }
        let f16 = self.weight_types.get("float16").copied().unwrap_or(0);
        let f32 = self.weight_types.get("float32").copied().unwrap_or(0);
        if f16 > f32 {
            "f16".into()
        } else {
            "f32".into()
        }
    }
}

const QUANTIZED_OPS: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
];

type Plan = Arc<TypedRunnableModel>;

/// How a process loads its graphs.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub f16_mode: F16Mode,
    /// Compile cache directory; `None` optimizes from the ONNX file every time.
    pub cache_dir: Option<PathBuf>,
    /// Bound on the compile cache's size; `None` lets it grow.
    pub cache_max_bytes: Option<u64>,
    /// Attention whose score tensor is larger runs in slices of query rows no
    /// larger than this; `None` computes every score matrix whole.
    pub attention_slice_bytes: Option<usize>,
    /// Which kernels run the convolutions and large matrix products.
    pub matrix_path: MatrixPath,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            f16_mode: F16Mode::from_env_or_cpu(),
            cache_dir: None,
            cache_max_bytes: None,
            attention_slice_bytes: Some(DEFAULT_ATTENTION_SLICE_BYTES),
            matrix_path: MatrixPath::from_env_or_cpu(),
        }
    }
}

/// Where a model's plans come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// No compile cache.
    Off,
    /// Parsed from ONNX; plans are saved to the cache as they are built.
    Cold,
    /// Described by the cache; plans load from it when saved before.
    Warm,
}

impl CacheUse {
    pub fn name(self) -> &'static str {
        match self {
            CacheUse::Off => "off",
            CacheUse::Cold => "cold",
            CacheUse::Warm => "warm",
        }
    }
}

/// One ONNX graph with one optimized plan per input shape set. The graph
/// itself is parsed on first need: with a warm compile cache, never.
pub struct OnnxModel {
    path: PathBuf,
    graph: Mutex<Option<Arc<InferenceModel>>>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<String>,
    summary: GraphSummary,
    /// Float16 graph run as float32 (`F16Mode::Float32`).
    upcast_f16: bool,
    cached: Option<CachedModel>,
    cache_use: CacheUse,
    attention_slice_bytes: Option<usize>,
    matrix_path: MatrixPath,
    plans: Mutex<HashMap<Vec<Vec<usize>>, Plan>>,
}

impl fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnnxModel")
            .field("path", &self.path)
            .finish()
    }
}

/// An ONNX file parsed into tract's inference graph, with what was learnt on the way.
struct Parsed {
    graph: InferenceModel,
    meta: ModelMeta,
    external_files: Vec<PathBuf>,
}

impl OnnxModel {
    /// Loads a graph; float16 graphs run as `F16Mode::from_env_or_cpu()` says.
    pub fn load(path: &Path) -> Result<Self> {
        Self::open(path, &ModelOptions::default())
    }

    pub fn load_with(path: &Path, f16_mode: F16Mode) -> Result<Self> {
        Self::open(
            path,
            &ModelOptions {
                f16_mode,
                ..ModelOptions::default()
            },
        )
    }

    pub fn open(path: &Path, options: &ModelOptions) -> Result<Self> {
        prefer_im2col_on_wide_vectors();
        let _allocator = LoadingAllocator::new();
        if !path.is_file() {
            bail!("{}: file not found", path.display());
        }
        let cache = options
            .cache_dir
            .as_ref()
            .map(|dir| PlanCache::new(dir).with_max_bytes(options.cache_max_bytes));
        if let Some((cached, meta)) = cache.as_ref().and_then(|c| c.lookup(path)) {
            log::debug!("{}: description from the compile cache", path.display());
            return Ok(Self::new(path, meta, None, options, Some(cached)));
        }
        let parsed = parse(path)?;
        let cached = cache.and_then(|c| {
            c.record(path, &parsed.external_files, &parsed.meta)
                .map_err(|err| log::warn!("compile cache: {}: {err:#}", path.display()))
                .ok()
        });
        Ok(Self::new(
            path,
            parsed.meta,
            Some(parsed.graph),
            options,
            cached,
        ))
    }

    fn new(
        path: &Path,
        meta: ModelMeta,
        graph: Option<InferenceModel>,
        options: &ModelOptions,
        cached: Option<CachedModel>,
    ) -> Self {
        let graph_parsed = graph.is_some();
        OnnxModel {
            path: path.to_path_buf(),
            graph: Mutex::new(graph.map(Arc::new)),
            inputs: meta.inputs,
            outputs: meta.outputs,
            summary: meta.summary,
            upcast_f16: meta.has_f16 && options.f16_mode == F16Mode::Float32,
            cache_use: match (&cached, graph_parsed) {
                (None, _) => CacheUse::Off,
                (Some(_), true) => CacheUse::Cold,
                (Some(_), false) => CacheUse::Warm,
            },
            cached,
            attention_slice_bytes: options.attention_slice_bytes,
            matrix_path: options.matrix_path,
            plans: Mutex::new(HashMap::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Operator name → node count over every plan built so far.
    pub fn plan_op_counts(&self) -> Result<BTreeMap<String, usize>> {
        let plans = self
            .plans
            .lock()
            .map_err(|_| anyhow!("plan cache poisoned"))?;
        let mut counts = BTreeMap::new();
        for plan in plans.values() {
            for node in plan.model().nodes() {
                *counts.entry(node.op.name().to_string()).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// Whether this model was described by the compile cache when loaded.
    pub fn cache_use(&self) -> CacheUse {
        self.cache_use
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }

    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    pub fn summary(&self) -> &GraphSummary {
        &self.summary
    }

    /// Runs the graph; `inputs` are matched by name, outputs come back as f32 in graph order.
    pub fn run(&self, inputs: Vec<(&str, Input)>) -> Result<Vec<ArrayD<f32>>> {
        let values = self.feed(inputs)?;
        let shapes: Vec<Vec<usize>> = values.iter().map(|t| t.shape().to_vec()).collect();
        let plan = self.plan(&shapes)?;
        let outputs = plan.run(values.into_iter().map(|t| t.into_tvalue()).collect());
        gemm_path::release_scratch();
        let outputs = outputs
            .map_err(|e| anyhow!("{}: running the graph failed: {e:#}", self.path.display()))?;
        outputs.into_iter().map(|v| self.to_array(v)).collect()
    }

    /// Builds the optimized plan `run` would use for these inputs without
    /// running it, so optimization can be timed apart from the first run.
    pub fn prepare(&self, inputs: Vec<(&str, Input)>) -> Result<()> {
        let values = self.feed(inputs)?;
        let shapes: Vec<Vec<usize>> = values.iter().map(|t| t.shape().to_vec()).collect();
        self.plan(&shapes).map(|_| ())
    }

    /// Inputs matched by name and converted to the graph's declared types, in graph order.
    fn feed(&self, inputs: Vec<(&str, Input)>) -> Result<TVec<Tensor>> {
        let mut by_name: HashMap<&str, Input> = inputs.into_iter().collect();
        let mut values = TVec::new();
        for spec in &self.inputs {
            let input = by_name.remove(spec.name.as_str()).ok_or_else(|| {
                anyhow!(
                    "{}: no value given for input '{}'",
                    self.path.display(),
                    spec.name
                )
            })?;
            values.push(self.to_tensor(spec, input)?);
        }
        if let Some(name) = by_name.keys().next() {
            bail!(
                "{}: the graph has no input '{name}' (inputs: {})",
                self.path.display(),
                self.input_names()
            );
        }
        Ok(values)
    }

    fn input_names(&self) -> String {
        let names: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
        names.join(", ")
    }

    fn to_tensor(&self, spec: &TensorSpec, input: Input) -> Result<Tensor> {
        let input = if spec.rank() == Some(0) {
            input.collapse_repeated()
        } else {
            input
        };
        let shape = self.fit_shape(spec, input.shape())?;
        let tensor = match (spec.element, input) {
            (ElementType::F32, Input::Float(a)) => a.into_tensor(),
            (ElementType::F16, Input::Float(a)) => a.into_tensor().cast_to::<f16>()?.into_owned(),
            (ElementType::I64, Input::Int(a)) => a.into_tensor(),
            (ElementType::I32, Input::Int(a)) => a.mapv(|v| v as i32).into_tensor(),
            // Matches numpy's float→int conversion that diffusers' ONNX pipelines use.
            (ElementType::I64, Input::Float(a)) => a.mapv(|v| v as i64).into_tensor(),
            (ElementType::I32, Input::Float(a)) => a.mapv(|v| v as i32).into_tensor(),
            (ElementType::F32, Input::Int(a)) => a.mapv(|v| v as f32).into_tensor(),
            (ElementType::F16, Input::Int(a)) => a
                .mapv(|v| v as f32)
                .into_tensor()
                .cast_to::<f16>()?
                .into_owned(),
            (ElementType::Other, _) => bail!(
                "{}: input '{}' has an element type edgegen cannot feed",
                self.path.display(),
                spec.name
            ),
        };
        // An upcast float16 graph takes float32 inputs.
        let tensor = if self.upcast_f16 && tensor.datum_type() == f16::datum_type() {
            tensor.cast_to::<f32>()?.into_owned()
        } else {
            tensor
        };
        tensor.into_shape(&shape)
    }

    /// Reconciles a given shape with the declared rank: a one-element value
    /// feeds a rank-0 input (optimum exports the timestep as a scalar).
    fn fit_shape(&self, spec: &TensorSpec, given: &[usize]) -> Result<Vec<usize>> {
        let Some(declared) = &spec.shape else {
            return Ok(given.to_vec());
        };
        let count: usize = given.iter().product();
        if declared.is_empty() && count == 1 {
            return Ok(vec![]);
        }
        if declared.is_empty() {
            bail!(
                "{}: input '{}' is a scalar but {count} values were given",
                self.path.display(),
                spec.name
            );
        }
        if declared.len() != given.len() {
            bail!(
                "{}: input '{}' has rank {} but a value of shape {given:?} was given",
                self.path.display(),
                spec.name,
                declared.len()
            );
        }
        for (axis, (d, g)) in declared.iter().zip(given).enumerate() {
            if let Some(d) = d {
                if d != g {
                    bail!(
                        "{}: input '{}' needs size {d} on axis {axis}, got {g} (shape {given:?})",
                        self.path.display(),
                        spec.name
                    );
                }
            }
        }
        Ok(given.to_vec())
    }

    fn to_array(&self, value: TValue) -> Result<ArrayD<f32>> {
        let tensor = value.into_tensor();
        let tensor = if tensor.datum_type() == f32::datum_type() {
            tensor
        } else {
            tensor.cast_to::<f32>()?.into_owned()
        };
        let view = tensor
            .to_plain_array_view::<f32>()
            .map_err(|e| anyhow!("{}: reading an output: {e:#}", self.path.display()))?;
        Ok(view.to_owned())
    }

    /// The optimized plan for these exact input shapes, built on first use.
    pub fn plan(&self, shapes: &[Vec<usize>]) -> Result<Plan> {
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| anyhow!("plan cache poisoned"))?;
        if let Some(plan) = plans.get(shapes) {
            return Ok(plan.clone());
        }
        let started = std::time::Instant::now();
        let plan = {
            let _allocator = LoadingAllocator::new();
            self.optimize(shapes)?
        };
        kernels::note_plan(&self.path, &plan);
        log::info!(
            "optimized {} for shapes {shapes:?} in {:.2?}",
            self.path.display(),
            started.elapsed()
        );
        plans.insert(shapes.to_vec(), plan.clone());
        Ok(plan)
    }

    fn optimize(&self, shapes: &[Vec<usize>]) -> Result<Plan> {
        let context = || {
            format!(
                "{}: optimizing for input shapes {shapes:?}",
                self.path.display()
            )
        };
        let key = PlanKey {
            shapes: shapes.to_vec(),
            upcast_f16: self.upcast_f16,
        };
        let (mut typed, weights) = self.decluttered(&key).with_context(context)?;
        #[cfg(feature = "cuda")]
        if let Some(plan) = cuda::prepare(&typed).with_context(context)? {
            return Ok(plan);
        }
        if let Some(bytes) = self.attention_slice_bytes {
            let sliced = attention::slice_attention(&mut typed, bytes)
                .map_err(|e| anyhow!("{e:#}"))
                .with_context(context)?;
            if sliced > 0 {
                log::debug!(
                    "{}: {sliced} attention blocks run in slices",
                    self.path.display()
                );
            }
        }
        if self.matrix_path != MatrixPath::Tract {
            let keep_with_tract = |w: &Arc<Tensor>| weights.is_standin(w);
            let routed = gemm_path::route(&mut typed, self.matrix_path, keep_with_tract)
                .with_context(context)?;
            log::debug!(
                "{}: {} ops on the gemm matrix path: {:?}",
                self.path.display(),
                routed.total(),
                routed.0
            );
        }
        let mapped = matches!(weights, fold::Weights::Mapped { .. });
        let weights = Arc::new(Mutex::new(weights));
        let optimized = match codegen(typed, &weights) {
            Ok(optimized) => optimized,
            Err(err) if mapped => {
                log::warn!(
                    "{}: the saved packed weights do not fit the plan ({err:#}); packing again",
                    self.path.display()
                );
                drop(weights);
                if let Some(cached) = &self.cached {
                    cached.forget_packed(&key);
                }
                return self.optimize(shapes);
            }
            Err(err) => return Err(err).with_context(context),
        };
        self.save_packed(&key, &weights);
        let runnable = optimized
            .into_runnable()
            .map_err(|e| anyhow!("{e:#}"))
            .with_context(context)?;
        Ok(runnable)
    }

    /// Saves what codegen packed of a graph read back from the compile cache.
    fn save_packed(&self, key: &PlanKey, weights: &Mutex<fold::Weights>) {
        let (Some(cached), Ok(mut weights)) = (&self.cached, weights.lock()) else {
            return;
        };
        let fold::Weights::Record { packed, .. } = &mut *weights else {
            return;
        };
        if packed.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        match cached.store_packed(key, packed) {
            Ok(()) => log::debug!(
                "{}: {} packed weights saved in {:.2?}",
                self.path.display(),
                packed.len(),
                started.elapsed()
            ),
            Err(err) => log::warn!(
                "compile cache: could not save the packed weights of {}: {err:#}",
                self.path.display()
            ),
        }
        packed.clear();
    }

    /// The typed, decluttered graph for this key: from the compile cache
    /// when it has it, else built from the ONNX graph and saved there. A
    /// saved graph is read back at once, so that this start's codegen can
    /// save its packed weights and the next start maps them.
    fn decluttered(&self, key: &PlanKey) -> Result<(TypedModel, fold::Weights)> {
        let started = std::time::Instant::now();
        if let Some(loaded) = self.read_back(key)? {
            log::debug!(
                "{}: shapes {:?} from the compile cache in {:.2?}",
                self.path.display(),
                key.shapes,
                started.elapsed()
            );
            return Ok(loaded);
        }
        let typed = self.build_typed(&key.shapes)?;
        log::debug!("typed and decluttered in {:.2?}", started.elapsed());
        let Some(cached) = &self.cached else {
            return Ok((typed, fold::Weights::Anonymous));
        };
        if let Err(err) = cached.store(key, &typed) {
            log::warn!(
                "compile cache: could not save {} for shapes {:?}: {err:#}",
                self.path.display(),
                key.shapes
            );
            return Ok((typed, fold::Weights::Anonymous));
        }
        drop(typed);
        match self.read_back(key)? {
            Some(loaded) => Ok(loaded),
            None => Ok((self.build_typed(&key.shapes)?, fold::Weights::Anonymous)),
        }
    }

    /// The saved graph for this key, decluttered again after reading; none
    /// (and the entry dropped) when it fails to.
    fn read_back(&self, key: &PlanKey) -> Result<Option<(TypedModel, fold::Weights)>> {
        let Some(cached) = &self.cached else {
            return Ok(None);
        };
        let Some(loaded) = cached.load(key) else {
            return Ok(None);
        };
        let mut typed = loaded.model;
        // Reading NNEF back wires some axis moves apart; declutter folds them again.
        if let Err(err) = aside::declutter(&mut typed, |w| fold::is_savable_weight(w)) {
            log::warn!(
                "{}: the compile cache's graph for shapes {:?} does not declutter ({err:#}); rebuilding it",
                self.path.display(),
                key.shapes
            );
            cached.forget(key);
            return Ok(None);
        }
        Ok(Some((typed, loaded.weights)))
    }

    fn build_typed(&self, shapes: &[Vec<usize>]) -> Result<TypedModel> {
        let mut graph = (*self.graph()?).clone();
        for (ix, (spec, shape)) in self.inputs.iter().zip(shapes).enumerate() {
            let fact =
                InferenceFact::dt_shape(datum_type(spec.element, &self.path)?, shape.clone());
            graph.set_input_fact(ix, fact)?;
        }
        let mut typed = graph.into_typed().map_err(|e| anyhow!("{e:#}"))?;
        if self.upcast_f16 {
            quant::upcast_f16(&mut typed)
                .map_err(|e| anyhow!("{e:#}"))
                .with_context(|| {
                    format!("{}: converting float16 to float32", self.path.display())
                })?;
        }
        typed.into_decluttered().map_err(|e| anyhow!("{e:#}"))
    }

    /// The inference graph, parsed now if the compile cache spared it so far.
    fn graph(&self) -> Result<Arc<InferenceModel>> {
        let mut graph = self
            .graph
            .lock()
            .map_err(|_| anyhow!("graph lock poisoned"))?;
        if let Some(graph) = graph.as_ref() {
            return Ok(graph.clone());
        }
        let parsed = Arc::new(parse(&self.path)?.graph);
        *graph = Some(parsed.clone());
        Ok(parsed)
    }
}

/// tract's codegen pass. The graph is decluttered already (built so, or saved
/// so in the compile cache), which is the other half of `into_optimized`.
fn codegen(mut typed: TypedModel, weights: &Arc<Mutex<fold::Weights>>) -> Result<TypedModel> {
    typed
        .optimize_with_session(&mut fold::codegen_optimizer(weights.clone()).session())
        .map_err(|e| anyhow!("{e:#}"))?;
    weights
        .lock()
        .map_err(|_| anyhow!("weights lock poisoned"))?
        .check_complete()
        .map_err(|e| anyhow!("{e:#}"))?;
    Ok(typed)
}

/// Reads and checks an ONNX file: readable, only operators tract runs, no
/// dangling tensors; float16 Gemms rewritten for tract.
fn parse(path: &Path) -> Result<Parsed> {
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let mut proto = onnx
        .proto_model_for_path(path)
        .map_err(|e| anyhow!("{}: not a readable ONNX model: {e:#}", path.display()))?;
    let summary = summarize(&proto);
    quant::check_supported(path, &proto)?;
    let has_f16 = quant::has_f16(&proto);
    if has_f16 {
        let gemms = quant::rewrite_f16_gemms(&mut proto);
        log::debug!(
            "{}: float16 graph; {gemms} Gemm nodes rewritten as MatMul + Add",
            path.display()
        );
    }
    let external_files = external_data_files(path, &proto);
    let dir = path.parent().and_then(|d| d.to_str());
    let parsed = onnx
        .parse(&proto, dir)
        .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
    if !parsed.unresolved_inputs.is_empty() {
        bail!(
            "{}: graph refers to undefined tensors {:?}",
            path.display(),
            parsed.unresolved_inputs
        );
    }
    let graph = parsed.model;
    reject_unsupported_ops(path, &graph)?;
    let meta = ModelMeta {
        inputs: input_specs(path, &graph)?,
        outputs: output_names(&graph)?,
        summary,
        has_f16,
    };
    log::debug!("loaded {} ({} nodes)", path.display(), graph.nodes().len());
    Ok(Parsed {
        graph,
        meta,
        external_files,
    })
}

/// The external data files the graph's initializers name, each once.
fn external_data_files(path: &Path, proto: &tract_onnx::pb::ModelProto) -> Vec<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = proto
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .flat_map(|init| &init.external_data)
        .filter(|entry| entry.key == "location")
        .map(|entry| dir.join(&entry.value))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Bytes of the weights (initializers) an ONNX file declares, inline or in
/// external data files, from their shapes and element types; what a
/// component needs in memory at the least.
pub fn weight_bytes(path: &Path) -> Result<u64> {
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| anyhow!("{}: not a readable ONNX model: {e:#}", path.display()))?;
    let Some(graph) = &proto.graph else {
        return Ok(0);
    };
    let mut total = 0u64;
    for init in &graph.initializer {
        let elements: u64 = init.dims.iter().map(|&d| d.max(0) as u64).product();
        let element_bytes = match DataType::try_from(init.data_type) {
            Ok(DataType::Int8 | DataType::Uint8 | DataType::Bool) => 1,
            Ok(DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16) => 2,
            Ok(DataType::Float | DataType::Int32 | DataType::Uint32) => 4,
            Ok(DataType::Double | DataType::Int64 | DataType::Uint64) => 8,
            _ => bail!(
                "{}: initializer '{}' has element type {} whose size is unknown",
                path.display(),
                init.name,
                init.data_type
            ),
        };
        total += elements * element_bytes;
    }
    Ok(total)
}

fn datum_type(element: ElementType, path: &Path) -> Result<DatumType> {
    Ok(match element {
        ElementType::F32 => f32::datum_type(),
        ElementType::F16 => f16::datum_type(),
        ElementType::I32 => i32::datum_type(),
        ElementType::I64 => i64::datum_type(),
        ElementType::Other => bail!("{}: unsupported input element type", path.display()),
    })
}

fn reject_unsupported_ops(path: &Path, graph: &InferenceModel) -> Result<()> {
    for node in graph.nodes() {
        let op_name = node.op.name();
        if let Some(op) = op_name.strip_prefix("Unimplemented(") {
            let op = op.trim_end_matches(')');
            bail!(
                "{}: node '{}' uses operator '{op}', which tract cannot run",
                path.display(),
                node.name
            );
        }
    }
    Ok(())
}

fn input_specs(path: &Path, graph: &InferenceModel) -> Result<Vec<TensorSpec>> {
    let mut specs = Vec::new();
    for (ix, outlet) in graph.input_outlets()?.iter().enumerate() {
        let fact = graph.input_fact(ix)?;
        let element = match fact.datum_type() {
            Some(dt) if dt == f32::datum_type() => ElementType::F32,
            Some(dt) if dt == f16::datum_type() => ElementType::F16,
            Some(dt) if dt == i32::datum_type() => ElementType::I32,
            Some(dt) if dt == i64::datum_type() => ElementType::I64,
            _ => ElementType::Other,
        };
        let shape = (!fact.shape.is_open()).then(|| {
            fact.shape
                .dims()
                .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
                .collect::<Vec<_>>()
        });
        let name = graph.node(outlet.node).name.clone();
        log::trace!("{}: input {name}", path.display());
        specs.push(TensorSpec {
            name,
            element,
            shape,
        });
    }
    Ok(specs)
}

fn output_names(graph: &InferenceModel) -> Result<Vec<String>> {
    Ok(graph
        .output_outlets()?
        .iter()
        .map(|o| {
            graph
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| graph.node(o.node).name.clone())
        })
        .collect())
}

fn summarize(proto: &tract_onnx::pb::ModelProto) -> GraphSummary {
    let mut summary = GraphSummary::default();
    let Some(graph) = &proto.graph else {
        return summary;
    };
    summary.node_count = graph.node.len();
    for node in &graph.node {
        if QUANTIZED_OPS.contains(&node.op_type.as_str()) {
            *summary
                .quantized_ops
                .entry(node.op_type.clone())
                .or_default() += 1;
        }
    }
    for init in &graph.initializer {
        let elements: i64 = init.dims.iter().product();
        let name = match DataType::try_from(init.data_type) {
            Ok(DataType::Float) => "float32",
            Ok(DataType::Float16) => "float16",
            Ok(DataType::Int8) => "int8",
            Ok(DataType::Uint8) => "uint8",
            Ok(DataType::Int32) => "int32",
            Ok(DataType::Int64) => "int64",
            _ => "other",
        };
        *summary.weight_types.entry(name.to_string()).or_default() += elements.max(0) as usize;
    }
    summary
}
