//! CLIP tokenizer against ids from transformers' `CLIPTokenizer`.
//!
//! References: tests/fixtures/tokenizer*/reference_ids.json, written by
//! tools/fixtures/tokenizer.py. Token ids are exact: no tolerance, a single
//! differing id is a different prompt for the text encoder.

use std::fs;
use std::path::{Path, PathBuf};

use edgegen::tokenizer::ClipTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct References {
    pad_token_id: i64,
    max_length: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<i64>,
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load_references(dir: &Path) -> References {
    let path = dir.join("reference_ids.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Encodes every reference prompt and reports all mismatches at once.
fn assert_matches_references(name: &str, min_cases: usize) {
    let dir = fixture_dir(name);
    let tokenizer = ClipTokenizer::from_dir(&dir).expect("fixture tokenizer loads");
    let refs = load_references(&dir);
    assert!(
        refs.cases.len() >= min_cases,
        "{name}: only {} reference cases",
        refs.cases.len()
    );
    assert_eq!(tokenizer.max_length(), refs.max_length);

    let failures: Vec<String> = refs
        .cases
        .iter()
        .filter_map(|case| {
            let ids = tokenizer.encode(&case.prompt);
            (ids != case.ids).then(|| {
                format!(
                    "prompt {:?}\n  expected {:?}\n  got      {:?}",
                    case.prompt, case.ids, ids
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{name}: {} of {} prompts differ:\n{}",
        failures.len(),
        refs.cases.len(),
        failures.join("\n")
    );

    // The padding of the shortest prompt proves which pad id was read from the files.
    let empty = tokenizer.encode("");
    assert_eq!(empty[2], refs.pad_token_id);
}

#[test]
fn matches_transformers_sd15_layout() {
    assert_matches_references("tokenizer", 200);
}

#[test]
fn matches_transformers_sd2_pad_token() {
    // Pad "!" (id 0): transformers also cuts every "!" out of the prompt as a special token.
    assert_matches_references("tokenizer_pad_excl", 10);
}

#[test]
fn matches_transformers_added_tokens_decoder_layout() {
    // Flags come from tokenizer_config.json's added_tokens_decoder (eos not normalized,
    // so "<|ENDOFTEXT|>" is plain text); the special_tokens_map.json next to it,
    // which says otherwise, must be ignored as transformers ignores it.
    assert_matches_references("tokenizer_added_decoder", 10);
}

#[test]
fn encodings_have_fixed_length_and_keep_eos_when_truncated() {
    let tokenizer = ClipTokenizer::from_dir(&fixture_dir("tokenizer")).expect("fixture loads");
    let long = "red apple ".repeat(100);
    let ids = tokenizer.encode(&long);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 998, "bos first");
    assert_eq!(ids[76], 999, "eos kept at the end after truncation");
    assert_eq!(tokenizer.vocab_size(), 1000);
}

#[test]
fn encode_is_stable_across_calls() {
    // The second call is served from the BPE cache and must not change anything.
    let tokenizer = ClipTokenizer::from_dir(&fixture_dir("tokenizer")).expect("fixture loads");
    let first = tokenizer.encode("three purple flowers below the blue cloud");
    let second = tokenizer.encode("three purple flowers below the blue cloud");
    assert_eq!(first, second);
}

/// Copies the fixture tokenizer into a temporary directory, then lets `damage` break it.
fn damaged_copy(damage: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    for file in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        fs::copy(fixture_dir("tokenizer").join(file), tmp.path().join(file)).expect("copy fixture");
    }
    damage(tmp.path());
    tmp
}

fn load_error(dir: &Path) -> String {
    match ClipTokenizer::from_dir(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_vocab_is_an_error_naming_the_file() {
    let tmp = damaged_copy(|dir| fs::remove_file(dir.join("vocab.json")).expect("remove"));
    let message = load_error(tmp.path());
    assert!(message.contains("vocab.json"), "{message}");
}

#[test]
fn corrupt_vocab_is_an_error_naming_the_file() {
    let tmp = damaged_copy(|dir| {
        fs::write(dir.join("vocab.json"), "{\"a\": 0, \"b\": ").expect("write");
    });
    let message = load_error(tmp.path());
    assert!(message.contains("vocab.json"), "{message}");
}

#[test]
fn vocab_of_wrong_shape_is_an_error() {
    let tmp = damaged_copy(|dir| fs::write(dir.join("vocab.json"), "[1, 2, 3]").expect("write"));
    let message = load_error(tmp.path());
    assert!(message.contains("vocab.json"), "{message}");
}

#[test]
fn merge_with_unknown_token_is_an_error_naming_the_line() {
    let tmp = damaged_copy(|dir| {
        fs::write(dir.join("merges.txt"), "#version: 0.2\nl o\nzz qq\n").expect("write");
    });
    let message = load_error(tmp.path());
    assert!(message.contains("merges.txt line 3"), "{message}");
}

#[test]
fn malformed_merge_line_is_an_error() {
    let tmp = damaged_copy(|dir| {
        fs::write(dir.join("merges.txt"), "#version: 0.2\nl o r\n").expect("write");
    });
    let message = load_error(tmp.path());
    assert!(message.contains("merges.txt line 2"), "{message}");
}

#[test]
fn pad_token_missing_from_vocab_is_an_error() {
    let tmp = damaged_copy(|dir| {
        fs::write(
            dir.join("special_tokens_map.json"),
            "{\"pad_token\": \"<|pad|>\"}",
        )
        .expect("write");
    });
    let message = load_error(tmp.path());
    assert!(message.contains("<|pad|>"), "{message}");
}

#[test]
fn config_files_are_optional() {
    // Without the config files CLIP's defaults apply: pad = eos, 77 ids.
    let tmp = damaged_copy(|dir| {
        fs::remove_file(dir.join("tokenizer_config.json")).expect("remove");
        fs::remove_file(dir.join("special_tokens_map.json")).expect("remove");
    });
    let tokenizer = ClipTokenizer::from_dir(tmp.path()).expect("loads without configs");
    let ids = tokenizer.encode("a red apple");
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], 999);
}
