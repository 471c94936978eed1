//! The compile cache: a warm start (the decluttered graph read back from the
//! cache) builds the same plan and gives bit-identical outputs as a cold one,
//! without parsing the ONNX file; changed or damaged entries are rebuilt,
//! never trusted; an unusable cache directory only costs the cache.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::tmpfs::Tmpfs;
use common::{fixtures, named_inputs, read_json};
use edgegen::engine::{cache_reserve, CacheUse, ModelOptions, OnnxModel};
use ndarray::ArrayD;
use serde_json::Value;

/// tract 0.23.9 has no NNEF form for the op its ONNX front end makes of
/// DynamicQuantizeLinear (and the type is private, so edgegen cannot add one):
/// such graphs run uncached, parsed on every start.
const NOT_SAVABLE: &[&str] = &["generator-dynamic-conv.onnx"];

/// Every kind of graph the pipelines load: UNets (with and without LCM's
/// timestep_cond), VAE and TAESD decoders, int8 (QDQ, QOperator, dynamic)
/// and float16 graphs; each with inputs from its reference file.
fn cases() -> Vec<(PathBuf, Value)> {
    let mut cases = Vec::new();
    for bundle in ["tiny-sd", "tiny-lcm", "tiny-sd-taesd"] {
        let references =
            read_json(&fixtures().join(format!("references/components-{bundle}.json")));
        for component in ["unet", "vae_decoder"] {
            cases.push((
                fixtures().join(format!("bundles/{bundle}/{component}/model.onnx")),
                references[component]["inputs"].clone(),
            ));
        }
    }
    cases.push(text_encoder());
    let quantized = read_json(&fixtures().join("quantized/references.json"));
    for (stem, record) in quantized["files"].as_object().unwrap() {
        let source = record["inputs"].as_str().unwrap();
        cases.push((
            fixtures().join(format!("quantized/{stem}.onnx")),
            quantized["inputs"][source].clone(),
        ));
    }
    cases
}

/// The bundled default model's text encoder: its matrix products' weights
/// are large enough to be saved packed, and NNEF stores each with the unit
/// batch axis that declutter removes again on loading.
fn text_encoder() -> (PathBuf, Value) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes-sd/text_encoder/model.onnx");
    let ids: Vec<u32> = (0..77)
        .map(|i| if i < 6 { 40 + 7 * i } else { 0 })
        .collect();
    let inputs = serde_json::json!({
        "input_ids": {"shape": [1, 77], "data": ids, "dtype": "int64"}
    });
    (path, inputs)
}

fn open(path: &Path, cache: Option<&Path>) -> OnnxModel {
    let options = ModelOptions {
        cache_dir: cache.map(Path::to_path_buf),
        ..ModelOptions::default()
    };
    OnnxModel::open(path, &options).unwrap()
}

fn run(model: &OnnxModel, inputs: &Value) -> Vec<ArrayD<f32>> {
    model.run(named_inputs(inputs)).unwrap()
}

/// The saved graph of each plan: whole, or (when it has packed weights) the
/// skeleton that replaced it.
fn plan_files(cache: &Path) -> Vec<PathBuf> {
    let mut files = cache_files(cache, ".nnef.tar");
    files.extend(cache_files(cache, ".skeleton.tar"));
    files
}

/// A file's identity and modification time: a file saved again differs in
/// one of them (a deleted file's inode number may be reused).
fn stamp(path: &Path) -> (u64, std::time::SystemTime) {
    let metadata = fs::metadata(path).unwrap();
    (metadata.ino(), metadata.modified().unwrap())
}

fn cache_files(cache: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(cache).unwrap() {
        let dir = entry.unwrap().path();
        if dir.file_name().is_some_and(|n| n == "files") || !dir.is_dir() {
            continue;
        }
        for file in fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            if file.to_string_lossy().ends_with(suffix) {
                files.push(file);
            }
        }
    }
    files
}

#[test]
fn warm_start_is_the_cold_start_bit_for_bit() {
    let mut mapped_starts = Vec::new();
    for (path, inputs) in cases() {
        let cache = tempfile::tempdir().unwrap();
        let uncached = open(&path, None);
        assert_eq!(uncached.cache_use(), CacheUse::Off);
        let expected = run(&uncached, &inputs);

        let cold = open(&path, Some(cache.path()));
        assert_eq!(cold.cache_use(), CacheUse::Cold, "{}", path.display());
        assert_eq!(run(&cold, &inputs), expected, "{}: cold", path.display());
        let saved = usize::from(!NOT_SAVABLE.iter().any(|stem| path.ends_with(stem)));
        assert_eq!(
            plan_files(cache.path()).len(),
            saved,
            "{}: saved graphs",
            path.display()
        );

        // The cold start read its saved graph back and saved the packed weights
        // its codegen made; the warm start maps them.
        let skeleton = cache_files(cache.path(), ".skeleton.tar").pop();
        let packed = cache_files(cache.path(), ".packed").pop();
        let saved_as = packed.as_deref().map(stamp);
        if skeleton.is_some() {
            assert!(
                cache_files(cache.path(), ".nnef.tar").is_empty(),
                "{}: the whole graph is kept beside its skeleton",
                path.display()
            );
        }

        let warm = open(&path, Some(cache.path()));
        assert_eq!(warm.cache_use(), CacheUse::Warm, "{}", path.display());
        assert_eq!(warm.inputs().len(), cold.inputs().len());
        assert_eq!(warm.outputs(), cold.outputs());
        assert_eq!(warm.summary().quantization(), cold.summary().quantization());
        assert_eq!(run(&warm, &inputs), expected, "{}: warm", path.display());
        let (warm_ops, uncached_ops) = (
            warm.plan_op_counts().unwrap(),
            uncached.plan_op_counts().unwrap(),
        );
        assert_eq!(
            compute_ops(&warm_ops),
            compute_ops(&uncached_ops),
            "{}: warm plan computes differently",
            path.display()
        );
        let nodes = |ops: &BTreeMap<String, usize>| -> usize {
            ops.iter()
                .filter(|(op, _)| *op != "Cast")
                .map(|(_, n)| n)
                .sum()
        };
        assert!(
            nodes(&warm_ops) <= nodes(&uncached_ops),
            "{}: warm plan has more nodes: {warm_ops:?} against {uncached_ops:?}",
            path.display()
        );
        assert_eq!(
            compute_ops(&cold.plan_op_counts().unwrap()),
            compute_ops(&warm_ops),
            "{}: cold plan computes differently",
            path.display()
        );
        if let (Some(packed), Some(saved_as)) = (packed, saved_as) {
            // A start that finds the packed weights unusable packs and saves them again.
            assert_eq!(
                stamp(&packed),
                saved_as,
                "{}: the warm start did not use its packed weights",
                path.display()
            );
            mapped_starts.push(path.clone());
        }
    }
    assert!(
        mapped_starts.len() >= 5,
        "only {mapped_starts:?} had packed weights saved"
    );
    assert!(
        mapped_starts.contains(&text_encoder().0),
        "the text encoder's matrix product weights were not saved packed"
    );
}

/// The plan without its data-movement nodes. Reading the graph back from NNEF
/// and decluttering it again folds some of them further (UNets lose their
/// remaining axis moves), and QOperator int8 graphs come back with one Cast
/// per quantized convolution (NNEF keeps the quantization apart from the
/// tensor's type; the cast relabels u8 as quantized u8). Every computing
/// node must stay the same.
fn compute_ops(ops: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    ops.iter()
        .filter(|(op, _)| !["Const", "MoveAxis", "IntoShape", "Cast"].contains(&op.as_str()))
        .map(|(op, n)| (op.clone(), *n))
        .collect()
}

/// A fixture bundle's VAE decoder, with inputs from its reference file.
fn vae_decoder(bundle: &str) -> (PathBuf, Value) {
    let references = read_json(&fixtures().join(format!("references/components-{bundle}.json")));
    (
        fixtures().join(format!("bundles/{bundle}/vae_decoder/model.onnx")),
        references["vae_decoder"]["inputs"].clone(),
    )
}

fn tiny_vae() -> (PathBuf, Value) {
    vae_decoder("tiny-sd")
}

/// A copy of the tiny VAE decoder that a test may change, a cache beside it,
/// and the decoder's outputs from a first (cold) start.
struct Scratch {
    _dir: tempfile::TempDir,
    path: PathBuf,
    cache: PathBuf,
    inputs: Value,
    outputs: Vec<ArrayD<f32>>,
}

fn scratch_vae() -> Scratch {
    let (source, inputs) = tiny_vae();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let path = dir.path().join("model.onnx");
    fs::copy(source, &path).unwrap();
    let outputs = run(&open(&path, Some(&cache)), &inputs);
    Scratch {
        _dir: dir,
        path,
        cache,
        inputs,
        outputs,
    }
}

#[test]
fn a_changed_model_is_parsed_again_and_its_old_entries_dropped() {
    let Scratch {
        path,
        cache,
        inputs,
        ..
    } = &scratch_vae();
    let source = tiny_vae().0;
    let old_plans = plan_files(cache);
    assert_eq!(old_plans.len(), 1);

    // Another decoder with the same input: different weights, so different outputs.
    let other = fixtures().join("bundles/tiny-lcm/vae_decoder/model.onnx");
    assert_ne!(fs::read(&other).unwrap(), fs::read(&source).unwrap());
    fs::copy(&other, path).unwrap();
    let changed = open(path, Some(cache));
    assert_eq!(changed.cache_use(), CacheUse::Cold);
    assert_eq!(run(&changed, inputs), run(&open(&other, None), inputs));
    assert!(
        !old_plans[0].exists(),
        "the old model's graph is still cached"
    );
    assert_eq!(plan_files(cache).len(), 1);
}

#[test]
fn a_touched_but_unchanged_model_keeps_its_plans() {
    let Scratch {
        path,
        cache,
        inputs,
        outputs: expected,
        ..
    } = &scratch_vae();
    let plans = plan_files(cache);
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(later)
        .unwrap();
    // The stamp changed, so the file is hashed (and parsed) again: same hash.
    let touched = open(path, Some(cache));
    assert_eq!(touched.cache_use(), CacheUse::Cold);
    assert_eq!(run(&touched, inputs), *expected);
    assert_eq!(plan_files(cache), plans);
    assert_eq!(open(path, Some(cache)).cache_use(), CacheUse::Warm);
}

#[test]
fn damaged_entries_are_rebuilt() {
    let (path, inputs) = tiny_vae();
    let cache = tempfile::tempdir().unwrap();
    let expected = run(&open(&path, Some(cache.path())), &inputs);
    let plan = plan_files(cache.path()).remove(0);
    let size = fs::metadata(&plan).unwrap().len();
    fs::write(&plan, b"not a tar archive").unwrap();

    let warm = open(&path, Some(cache.path()));
    assert_eq!(warm.cache_use(), CacheUse::Warm);
    assert_eq!(run(&warm, &inputs), expected);
    assert_eq!(
        fs::metadata(&plan).unwrap().len(),
        size,
        "damaged graph not rewritten"
    );

    let meta = plan.parent().unwrap().join("meta.json");
    fs::write(&meta, b"{").unwrap();
    let reparsed = open(&path, Some(cache.path()));
    assert_eq!(reparsed.cache_use(), CacheUse::Cold);
    assert_eq!(run(&reparsed, &inputs), expected);
}

#[test]
fn an_unusable_cache_directory_only_costs_the_cache() {
    let (path, inputs) = tiny_vae();
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("cache");
    fs::write(&not_a_dir, b"a file where the cache should be").unwrap();
    let model = open(&path, Some(&not_a_dir));
    assert_eq!(model.cache_use(), CacheUse::Off);
    assert_eq!(run(&model, &inputs), run(&open(&path, None), &inputs));
}

/// Packed weights that do not fit (a cut file, an index naming another
/// packing) are dropped and packed again; the outputs never change.
#[test]
fn unusable_packed_weights_are_packed_again() {
    let references = read_json(&fixtures().join("references/components-tiny-sd.json"));
    let path = fixtures().join("bundles/tiny-sd/unet/model.onnx");
    let inputs = references["unet"]["inputs"].clone();
    let cache = tempfile::tempdir().unwrap();
    let expected = run(&open(&path, Some(cache.path())), &inputs);
    let skeleton = cache_files(cache.path(), ".skeleton.tar").remove(0);
    let packed = cache_files(cache.path(), ".packed").remove(0);
    let index = cache_files(cache.path(), ".packed.json").remove(0);
    let (packed_bytes, index_text) = (fs::read(&packed).unwrap(), fs::read(&index).unwrap());

    let damages: [(&str, &dyn Fn()); 2] = [
        ("cut", &|| {
            let bytes = fs::read(&packed).unwrap();
            fs::write(&packed, &bytes[..bytes.len() / 2]).unwrap();
        }),
        ("other format", &|| {
            let text = fs::read_to_string(&index).unwrap();
            fs::write(&index, text.replace("\"format\":\"", "\"format\":\"other ")).unwrap();
        }),
    ];
    for (damage, apply) in damages {
        apply();
        let before = stamp(&packed);
        let warm = open(&path, Some(cache.path()));
        assert_eq!(run(&warm, &inputs), expected, "{damage}");
        assert_ne!(
            stamp(&packed),
            before,
            "{damage}: packed file not saved again"
        );
        assert!(skeleton.is_file(), "{damage}: skeleton not saved again");
        assert!(
            fs::read(&packed).unwrap() == packed_bytes && fs::read(&index).unwrap() == index_text,
            "{damage}: packed weights not saved again as they were"
        );
        let mapped = open(&path, Some(cache.path()));
        assert_eq!(run(&mapped, &inputs), expected, "{damage}: mapped again");
    }
}

fn open_bounded(path: &Path, cache: &Path, max_bytes: u64) -> OnnxModel {
    let options = ModelOptions {
        cache_dir: Some(cache.to_path_buf()),
        cache_max_bytes: Some(max_bytes),
        ..ModelOptions::default()
    };
    OnnxModel::open(path, &options).unwrap()
}

/// The model directories that hold a saved plan.
fn plan_dirs(cache: &Path) -> BTreeSet<PathBuf> {
    plan_files(cache)
        .iter()
        .map(|f| f.parent().unwrap().to_path_buf())
        .collect()
}

/// Bytes of the plans saved in a cache (every model's, not their descriptions).
fn plan_bytes(cache: &Path) -> u64 {
    let mut files = plan_files(cache);
    files.extend(cache_files(cache, ".packed"));
    files.extend(cache_files(cache, ".packed.json"));
    files.iter().map(|f| fs::metadata(f).unwrap().len()).sum()
}

/// With `engine.cache_max_mb`, saving a plan deletes the least recently used
/// ones (a warm start counts as a use) until the cache fits; a deleted plan
/// is built again, with the same outputs.
#[test]
fn a_bounded_cache_deletes_the_least_recently_used_plans() {
    let decoders: Vec<(PathBuf, Value)> = ["tiny-sd", "tiny-lcm", "tiny-sd-taesd"]
        .into_iter()
        .map(vae_decoder)
        .collect();
    let sizes: Vec<u64> = decoders
        .iter()
        .map(|(path, inputs)| {
            let alone = tempfile::tempdir().unwrap();
            run(&open(path, Some(alone.path())), inputs);
            plan_bytes(alone.path())
        })
        .collect();
    let [(a, a_inputs), (b, b_inputs), (c, c_inputs)] = &decoders[..] else {
        unreachable!()
    };
    // Room for any two of them, not for all three.
    let max_bytes = sizes[0] + sizes[1].max(sizes[2]) + sizes[1].min(sizes[2]) / 2;
    let cache = tempfile::tempdir().unwrap();
    let expected_b = run(&open(b, None), b_inputs);

    run(&open_bounded(a, cache.path(), max_bytes), a_inputs);
    let dir_a = plan_dirs(cache.path());
    run(&open_bounded(b, cache.path(), max_bytes), b_inputs);
    assert_eq!(plan_bytes(cache.path()), sizes[0] + sizes[1]);
    let dir_b: BTreeSet<PathBuf> = plan_dirs(cache.path())
        .difference(&dir_a)
        .cloned()
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let warm_a = open_bounded(a, cache.path(), max_bytes);
    assert_eq!(warm_a.cache_use(), CacheUse::Warm);
    run(&warm_a, a_inputs);
    std::thread::sleep(std::time::Duration::from_millis(20));
    run(&open_bounded(c, cache.path(), max_bytes), c_inputs);

    let kept = plan_dirs(cache.path());
    assert_eq!(plan_bytes(cache.path()), sizes[0] + sizes[2]);
    assert!(
        kept.is_superset(&dir_a) && kept.is_disjoint(&dir_b),
        "the least recently used plan (the second model's) is not the one deleted"
    );
    let rebuilt = open_bounded(b, cache.path(), max_bytes);
    assert_eq!(run(&rebuilt, b_inputs), expected_b);
    assert!(plan_bytes(cache.path()) <= max_bytes.max(sizes[1]));
}

/// A 32 MiB tmpfs under `dir`; none (with the reason printed) without root.
fn small_disk(dir: &Path) -> Option<Tmpfs> {
    Tmpfs::mount(&dir.join("disk"), "size=32m")
}

/// The compile cache never takes the last tenth of its disk (pictures and the
/// spool share it): with less free than that nothing is saved; with just a
/// little more, another model's least recently used plan gives way first.
/// Outputs never change. Needs root for the tmpfs.
#[test]
fn the_cache_leaves_its_disk_a_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = small_disk(dir.path()) else {
        return;
    };
    let reserve = cache_reserve(disk.size());
    let cache = disk.path.join("cache");
    let (a, a_inputs) = vae_decoder("tiny-sd");
    let (b, b_inputs) = vae_decoder("tiny-lcm");
    let expected_a = run(&open(&a, None), &a_inputs);
    let expected_b = run(&open(&b, None), &b_inputs);
    let no_temporaries = |when: &str| {
        let left = cache_files(&cache, ".tmp");
        assert!(left.is_empty(), "{when}: temporary files left: {left:?}");
    };

    let filler = disk.fill_leaving(reserve - (64 << 10));
    assert_eq!(run(&open(&a, Some(&cache)), &a_inputs), expected_a);
    assert!(
        plan_files(&cache).is_empty(),
        "a plan was saved into the reserve"
    );
    no_temporaries("below the reserve");
    fs::remove_file(filler).unwrap();

    let filler = disk.fill_leaving(reserve + (8 << 20));
    assert_eq!(run(&open(&a, Some(&cache)), &a_inputs), expected_a);
    let dir_a = plan_dirs(&cache);
    assert_eq!(plan_files(&cache).len(), 1, "no plan saved with room");
    fs::remove_file(filler).unwrap();

    let _filler = disk.fill_leaving(reserve + (16 << 10));
    let free_before = disk.available();
    assert_eq!(run(&open(&b, Some(&cache)), &b_inputs), expected_b);
    let kept = plan_dirs(&cache);
    assert!(
        kept.is_disjoint(&dir_a) && !kept.is_empty(),
        "the first model's plan did not give way to the second's: {kept:?} (first {dir_a:?})"
    );
    no_temporaries("tight");
    assert!(
        disk.available() + (64 << 10) >= reserve,
        "{} bytes free after saving, reserve {reserve} (before: {free_before})",
        disk.available()
    );
    let warm_b = open(&b, Some(&cache));
    assert_eq!(warm_b.cache_use(), CacheUse::Warm);
    assert_eq!(run(&warm_b, &b_inputs), expected_b);
}

/// Saving packed weights needs room for them beside the whole graph they
/// replace. Without it the whole graph stays the plan (a warm start still);
/// once there is room, the next start saves them.
#[test]
fn packed_weights_wait_for_room_beside_the_whole_graph() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = small_disk(dir.path()) else {
        return;
    };
    let reserve = cache_reserve(disk.size());
    let cache = disk.path.join("cache");
    let (path, inputs) = text_encoder();
    let expected = run(&open(&path, None), &inputs);
    let weights = fs::metadata(&path).unwrap().len();

    let filler = disk.fill_leaving(reserve + weights * 3 / 2);
    assert_eq!(run(&open(&path, Some(&cache)), &inputs), expected);
    assert_eq!(
        cache_files(&cache, ".nnef.tar").len(),
        1,
        "whole graph saved"
    );
    assert!(
        cache_files(&cache, ".packed").is_empty()
            && cache_files(&cache, ".skeleton.tar").is_empty(),
        "packed weights saved into the reserve"
    );
    let warm = open(&path, Some(&cache));
    assert_eq!(warm.cache_use(), CacheUse::Warm);
    assert_eq!(run(&warm, &inputs), expected);

    fs::remove_file(filler).unwrap();
    assert_eq!(run(&open(&path, Some(&cache)), &inputs), expected);
    assert_eq!(
        cache_files(&cache, ".skeleton.tar").len(),
        1,
        "packed weights not saved with room"
    );
    assert!(cache_files(&cache, ".nnef.tar").is_empty());
    assert_eq!(run(&open(&path, Some(&cache)), &inputs), expected);
}
