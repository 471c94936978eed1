//! Compile cache: a graph's decluttered, shape-fixed form saved as NNEF (with
//! tract's extensions), so a restart skips ONNX parsing, type analysis and
//! decluttering and only runs tract's final codegen pass.
//!
//! tract cannot serialize an *optimized* plan (its packed kernels and
//! CPU-specific ops have no NNEF form), so the cached graph is the last
//! portable stage; what remains on a warm start is loading it and `into_optimized`.
//!
//! Layout under the cache directory:
//! - `files/<sha256 of the model path>.json`: the model's SHA-256 content
//!   hash, trusted while the file (and its external data files) keep their
//!   size and modification time, so a warm start does not re-read gigabytes.
//! - `<model hash>/meta.json`: inputs, outputs and quantization summary.
//! - `<model hash>/<plan key>.nnef.tar`: one graph per input-shape set; the key
//!   also covers the tract and edgegen versions, float16 handling and the CPU.
//! - `<plan key>.packed`, `.packed.json`, `.skeleton.tar`: written by the start
//!   that saved the graph, which reads it back for that, and then replacing
//!   it. The packed file holds the large weights in the layout this CPU's
//!   kernels read (see `packed`); the skeleton is the same graph with those
//!   weights replaced by stand-ins of their shape, so later starts neither
//!   read nor pack them. A graph without large weights stays whole.

use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_extra::WithTractExtra;
use tract_nnef::ast::{Identifier, ProtoModel};
use tract_nnef::framework::Nnef;
use tract_nnef::resource::{resource_path_to_id, Resource, ResourceLoader};
use tract_onnx::prelude::*;
use tract_onnx::WithOnnx;
use tract_transformers::WithTractTransformers;

use super::fold::{self, WeightNames, Weights};
use super::packed::{self, MappedWeights, PackedIndex, PackedWeight};
use super::{GraphSummary, TensorSpec};
use crate::file_stamp::FileStamp;

mod nnef_ext;
mod room;

pub use room::reserve as cache_reserve;

/// The tract release the crate is pinned to (`=` in Cargo.toml); part of every
/// plan key, because NNEF from one tract release is not promised to load in another.
pub const TRACT_VERSION: &str = "0.23.9";

/// What edgegen does to a graph before saving it; raised when that changes
/// between releases, so older entries are not read back (2: float16 weights
/// are stored as float32 when the graph runs as float32; 3: packed weights
/// come from a graph decluttered with its matrix products' weights set aside).
const GRAPH_REVISION: u32 = 3;

/// What a cached model needs to be used without parsing its ONNX file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelMeta {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<String>,
    pub summary: GraphSummary,
    /// Holds float16 tensors (weights, inputs or casts).
    pub has_f16: bool,
}

/// The remembered content hash of one model file and its external data.
#[derive(Debug, Serialize, Deserialize)]
struct Fingerprint {
    files: Vec<FileStamp>,
    sha256: String,
}

/// One model's entries in the cache.
#[derive(Clone, Debug)]
pub struct CachedModel {
    dir: PathBuf,
    hash: String,
    cache: PlanCache,
}

#[derive(Clone, Debug)]
pub struct PlanCache {
    dir: PathBuf,
    max_bytes: Option<u64>,
}

impl PlanCache {
    pub fn new(dir: impl Into<PathBuf>) -> PlanCache {
        PlanCache {
            dir: dir.into(),
            max_bytes: None,
        }
    }

    /// Keeps the plans of all models within `max_bytes`, deleting the least
    /// recently used ones after each save.
    pub fn with_max_bytes(self, max_bytes: Option<u64>) -> PlanCache {
        PlanCache { max_bytes, ..self }
    }

    /// The cached model for `path` if its remembered hash still applies and
    /// its description was saved: nothing of the model file is read.
    pub fn lookup(&self, path: &Path) -> Option<(CachedModel, ModelMeta)> {
        let fingerprint: Fingerprint = read_json(&self.fingerprint_path(path).ok()?).ok()?;
        let unchanged = fingerprint.files.iter().all(FileStamp::unchanged);
        if !unchanged {
            return None;
        }
        let model = self.model(&fingerprint.sha256);
        let meta = read_json(&model.dir.join("meta.json")).ok()?;
        Some((model, meta))
    }

    /// Hashes the model file and its external data files, remembers the hash
    /// against their stamps, saves the description and drops the entries of
    /// an earlier version of the same file.
    pub fn record(
        &self,
        path: &Path,
        external: &[PathBuf],
        meta: &ModelMeta,
    ) -> Result<CachedModel> {
        let mut files = vec![path.to_path_buf()];
        files.extend(external.iter().cloned());
        let stamps = files
            .iter()
            .map(|f| FileStamp::of(f).with_context(|| format!("{}", f.display())))
            .collect::<Result<Vec<_>>>()?;
        let sha256 = hash_files(&files)?;
        let fingerprint_path = self.fingerprint_path(path)?;
        if let Ok(old) = read_json::<Fingerprint>(&fingerprint_path) {
            if old.sha256 != sha256 {
                let stale = self.model(&old.sha256).dir;
                if let Err(err) = fs::remove_dir_all(&stale) {
                    log::debug!("compile cache: removing {}: {err}", stale.display());
                }
            }
        }
        let model = self.model(&sha256);
        write_atomically(&model.dir.join("meta.json"), |w| {
            serde_json::to_writer(w, meta).map_err(anyhow::Error::from)
        })?;
        let fingerprint = Fingerprint {
            files: stamps,
            sha256,
        };
        write_atomically(&fingerprint_path, |w| {
            serde_json::to_writer(w, &fingerprint).map_err(anyhow::Error::from)
        })?;
        Ok(model)
    }

    fn model(&self, sha256: &str) -> CachedModel {
        CachedModel {
            dir: self.dir.join(sha256),
            hash: sha256.to_string(),
            cache: self.clone(),
        }
    }

    /// Deletes the least recently used plans (of any model) until `incoming`
    /// more bytes fit the cache's bound and leave the disk its reserve; the
    /// plan `keep` (a file stem) stays whatever its size.
    fn make_room(&self, keep: &Path, incoming: u64) -> Result<()> {
        Ok(room::make_room(&self.dir, self.max_bytes, keep, incoming)?)
    }

    /// After a save: the saved plan's real size is on the disk now.
    fn trim(&self, keep: &Path) {
        if let Err(err) = self.make_room(keep, 0) {
            log::warn!("compile cache: {err:#}");
        }
    }

    fn fingerprint_path(&self, path: &Path) -> Result<PathBuf> {
        let absolute = fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
        let name = hex(&Sha256::digest(absolute.as_os_str().as_encoded_bytes()));
        Ok(self.dir.join("files").join(format!("{name}.json")))
    }
}

/// A saved graph read back, with what the codegen pass needs to know of its weights.
pub struct Loaded {
    pub model: TypedModel,
    pub weights: Weights,
}

/// The files of one plan key.
struct PlanFiles {
    graph: PathBuf,
    skeleton: PathBuf,
    packed: PathBuf,
    index: PathBuf,
}

impl CachedModel {
    /// The saved graph for this plan key, if there is one that loads: with its
    /// packed weights mapped when they were saved, else whole.
    pub fn load(&self, key: &PlanKey) -> Option<Loaded> {
        let files = self.files(key);
        if files.skeleton.is_file() {
            match load_mapped(&files) {
                Ok(loaded) => {
                    mark_used(&files.skeleton);
                    return Some(loaded);
                }
                Err(err) => {
                    log::warn!(
                        "compile cache: {} does not load ({err:#}); reading the whole graph",
                        files.skeleton.display()
                    );
                    self.forget_packed(key);
                }
            }
        }
        match load_whole(&files.graph) {
            Ok(loaded) => {
                mark_used(&files.graph);
                Some(loaded)
            }
            Err(err) => {
                if files.graph.exists() {
                    log::warn!(
                        "compile cache: {} does not load ({err:#}); rebuilding it",
                        files.graph.display()
                    );
                    let _ = fs::remove_file(&files.graph);
                }
                None
            }
        }
    }

    pub fn store(&self, key: &PlanKey, model: &TypedModel) -> Result<()> {
        self.cache.make_room(&self.stem(key), const_bytes(model))?;
        write_atomically(&self.files(key).graph, |w| {
            nnef()
                .write_to_tar(model, w)
                .map(|_| ())
                .map_err(|e| anyhow!("{e:#}"))
        })?;
        self.cache.trim(&self.stem(key));
        Ok(())
    }

    /// Saves the packed weights of a plan built from the saved graph, and the
    /// skeleton graph that refers to them, in place of the whole graph. The
    /// skeleton goes last: it is what a start looks for.
    pub fn store_packed(&self, key: &PlanKey, weights: &[PackedWeight]) -> Result<()> {
        let files = self.files(key);
        self.cache
            .make_room(&self.stem(key), packed::file_bytes(weights))?;
        let mut index = PackedIndex::new();
        write_atomically(&files.packed, |w| {
            index = packed::write(w, weights)?;
            Ok(())
        })?;
        write_atomically(&files.index, |w| {
            serde_json::to_writer(w, &index).map_err(anyhow::Error::from)
        })?;
        write_atomically(&files.skeleton, |w| write_skeleton(&files.graph, &index, w))?;
        // The skeleton and the packed file hold the whole graph now. Should they
        // stop loading, the graph is built from the model file again.
        remove_files([&files.graph]);
        self.cache.trim(&self.stem(key));
        Ok(())
    }

    /// Drops the packed weights and skeleton of a plan key.
    pub fn forget_packed(&self, key: &PlanKey) {
        let files = self.files(key);
        remove_files([&files.skeleton, &files.index, &files.packed]);
    }

    /// Drops every file of a plan key.
    pub fn forget(&self, key: &PlanKey) {
        let files = self.files(key);
        remove_files([&files.skeleton, &files.index, &files.packed, &files.graph]);
    }

    fn stem(&self, key: &PlanKey) -> PathBuf {
        self.dir.join(key.digest(&self.hash))
    }

    fn files(&self, key: &PlanKey) -> PlanFiles {
        let stem = self.stem(key);
        let with = |suffix: &str| {
            let mut name = stem.clone().into_os_string();
            name.push(suffix);
            PathBuf::from(name)
        };
        PlanFiles {
            graph: with(".nnef.tar"),
            skeleton: with(".skeleton.tar"),
            packed: with(".packed"),
            index: with(".packed.json"),
        }
    }
}

/// Reads a saved graph archive, naming its weights with `name` before the
/// graph is built (and the archive's own references to them are dropped).
fn read_graph(path: &Path, name: impl FnOnce(&ProtoModel) -> Result<Weights>) -> Result<Loaded> {
    let file = fs::File::open(path)?;
    let nnef = nnef();
    let proto = nnef
        .proto_model_for_read(&mut BufReader::new(file))
        .map_err(|e| anyhow!("{e:#}"))?;
    let weights = name(&proto)?;
    let model = nnef
        .model_for_proto_model(&proto)
        .map_err(|e| anyhow!("{e:#}"))?;
    Ok(Loaded { model, weights })
}

/// The whole saved graph, its large float32 weights known by their labels.
fn load_whole(path: &Path) -> Result<Loaded> {
    read_graph(path, |proto| {
        let mut labels = WeightNames::default();
        for (label, tensor) in &proto.tensors {
            if fold::is_savable_weight(tensor) {
                labels.insert(tensor, (label.0.clone(), tensor.shape().to_vec()));
            }
        }
        Ok(Weights::Record {
            labels,
            packed: vec![],
        })
    })
}

/// The skeleton graph, with its stand-ins to be replaced by the mapped weights.
fn load_mapped(files: &PlanFiles) -> Result<Loaded> {
    let index: PackedIndex = read_json(&files.index)?;
    let weights = MappedWeights::open(&files.packed, index)?;
    read_graph(&files.skeleton, |proto| {
        let mut standins = WeightNames::default();
        for label in weights.labels() {
            let tensor = proto
                .tensors
                .get(&Identifier(label.clone()))
                .with_context(|| format!("the skeleton has no weight {label}"))?;
            standins.insert(tensor, label.clone());
        }
        Ok(Weights::Mapped {
            standins,
            weights,
            replaced: 0,
        })
    })
}

/// A weight left out of a skeleton graph: its shape, and a serial number
/// that keeps stand-ins of one shape from comparing equal (tract merges
/// equal constants).
#[derive(Serialize, Deserialize)]
struct StandIn {
    shape: Vec<usize>,
    serial: usize,
}

/// Copies the whole graph's archive, writing a stand-in for each weight the
/// index holds instead of its data.
fn write_skeleton(graph: &Path, index: &PackedIndex, out: &mut dyn Write) -> Result<()> {
    let file = fs::File::open(graph).with_context(|| format!("{}", graph.display()))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut builder = tar::Builder::new(out);
    for (serial, entry) in archive.entries()?.enumerate() {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let path = path.strip_prefix("./").unwrap_or(&path).to_path_buf();
        let label = (path.extension().is_some_and(|e| e == "dat"))
            .then(|| resource_path_to_id(&path).ok())
            .flatten();
        if let Some(weight) = label.and_then(|l| index.get(&l)) {
            let text = serde_json::to_vec(&StandIn {
                shape: weight.shape.clone(),
                serial,
            })?;
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, path.with_extension("standin"), &text[..])?;
        } else {
            let mut header = entry.header().clone();
            builder.append_data(&mut header, &path, &mut entry)?;
        }
    }
    builder.finish()?;
    Ok(())
}

/// Reads stand-ins: float32 tensors of the weight's shape whose pages are
/// never touched (the packed form replaces them before any kernel reads).
struct StandInLoader;

impl ResourceLoader for StandInLoader {
    fn name(&self) -> tract_onnx::tract_core::internal::StaticName {
        "edgegen stand-in weights".into()
    }

    fn try_load(
        &self,
        path: &Path,
        reader: &mut dyn Read,
        _framework: &Nnef,
    ) -> TractResult<Option<(String, Arc<dyn Resource>)>> {
        if path.extension().is_none_or(|e| e != "standin") {
            return Ok(None);
        }
        let standin: StandIn = serde_json::from_reader(reader)?;
        // SAFETY: only the first two elements are ever read; they are written here.
        let mut tensor = unsafe { Tensor::uninitialized_dt(f32::datum_type(), &standin.shape)? };
        let mut plain = tensor.try_as_plain_ram_mut()?;
        let values = plain.as_slice_mut::<f32>()?;
        anyhow::ensure!(values.len() >= 2, "stand-in {} too small", path.display());
        values[0] = standin.serial as f32 + 1.0;
        values[1] = -values[0];
        Ok(Some((resource_path_to_id(path)?, Arc::new(tensor))))
    }
}

/// Everything besides the model's content that decides the saved graph.
#[derive(Debug)]
pub struct PlanKey {
    pub shapes: Vec<Vec<usize>>,
    pub upcast_f16: bool,
}

impl PlanKey {
    fn digest(&self, model_hash: &str) -> String {
        let cpu = super::kernels::cpu_report();
        let text = format!(
            "model={model_hash}\nshapes={:?}\nupcast_f16={}\ntract={TRACT_VERSION}\nedgegen={}\ngraph={GRAPH_REVISION}\ncpu={} {}",
            self.shapes,
            self.upcast_f16,
            env!("CARGO_PKG_VERSION"),
            cpu.arch,
            cpu.features.join(","),
        );
        hex(&Sha256::digest(text.as_bytes()))[..32].to_string()
    }
}

fn nnef() -> Nnef {
    let mut nnef = tract_nnef::nnef()
        .with_onnx()
        .with_tract_extra()
        .with_tract_transformers()
        .with_registry(nnef_ext::registry());
    nnef.resource_loaders.insert(0, Box::new(StandInLoader));
    nnef
}

/// The files of one plan key, their size and when the plan was last used.
struct SavedPlan {
    stem: PathBuf,
    files: Vec<PathBuf>,
    bytes: u64,
    used: std::time::SystemTime,
}

/// Every plan under the cache directory, grouped by plan key: files named
/// `<key>.<suffix>` in the models' directories (not their `meta.json`, nor
/// files being written).
fn saved_plans(dir: &Path) -> Vec<SavedPlan> {
    let mut plans: std::collections::BTreeMap<PathBuf, SavedPlan> = Default::default();
    let models = fs::read_dir(dir).into_iter().flatten().flatten();
    for model in models.filter(|m| m.file_name() != "files") {
        for file in fs::read_dir(model.path()).into_iter().flatten().flatten() {
            let name = file.file_name();
            let name = name.to_string_lossy();
            let Some((key, _)) = name.split_once('.') else {
                continue;
            };
            if key.is_empty() || key == "meta" {
                continue;
            }
            let Ok(metadata) = file.metadata() else {
                continue;
            };
            let stem = model.path().join(key);
            let used = metadata.modified().unwrap_or(std::time::UNIX_EPOCH);
            let plan = plans.entry(stem.clone()).or_insert(SavedPlan {
                stem,
                files: vec![],
                bytes: 0,
                used,
            });
            plan.files.push(file.path());
            plan.bytes += metadata.len();
            plan.used = plan.used.max(used);
        }
    }
    plans.into_values().collect()
}

/// Bytes of the constants of a graph: about what saving it writes.
fn const_bytes(model: &TypedModel) -> u64 {
    model
        .nodes
        .iter()
        .filter_map(|node| node.op_as::<tract_onnx::tract_core::ops::konst::Const>())
        .map(|konst| {
            let value = konst.val();
            (value.len() * value.datum_type().size_of()) as u64
        })
        .sum()
}

/// Records a plan's use in its file's modification time, which `trim` reads.
fn mark_used(path: &Path) {
    let touched = fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(err) = touched {
        log::debug!("compile cache: marking {} used: {err}", path.display());
    }
}

fn remove_files(paths: impl IntoIterator<Item = impl AsRef<Path>>) {
    for path in paths {
        let path = path.as_ref();
        if let Err(err) = fs::remove_file(path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                log::debug!("compile cache: removing {}: {err}", path.display());
            }
        }
    }
}

fn hash_files(files: &[PathBuf]) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for path in files {
        let mut file = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let file = fs::File::open(path)?;
    Ok(serde_json::from_reader(BufReader::new(file))?)
}

/// Writes to a unique temporary name in the same directory and renames it
/// into place, so a reader (or a second process) never sees half a file.
fn write_atomically(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{}: no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| anyhow!("{}", e.error()))?;
        file.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_keys_name_the_tract_release_cargo_pins() {
        let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .expect("Cargo.toml");
        assert!(
            manifest.contains(&format!("tract-onnx = \"={TRACT_VERSION}\"")),
            "TRACT_VERSION ({TRACT_VERSION}) is not the version Cargo.toml pins tract-onnx to"
        );
    }

    #[test]
    fn plan_keys_differ_by_shape_and_float16_handling() {
        let key = |shapes: Vec<Vec<usize>>, upcast_f16| PlanKey { shapes, upcast_f16 }.digest("m");
        let base = key(vec![vec![1, 4, 8, 8]], false);
        assert_eq!(base, key(vec![vec![1, 4, 8, 8]], false));
        assert_ne!(base, key(vec![vec![1, 4, 16, 16]], false));
        assert_ne!(base, key(vec![vec![1, 4, 8, 8]], true));
        assert_ne!(
            base,
            PlanKey {
                shapes: vec![vec![1, 4, 8, 8]],
                upcast_f16: false
            }
            .digest("other")
        );
    }
}
