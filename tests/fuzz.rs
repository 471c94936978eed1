//! Property tests (fuzzing) of the parsers that read untrusted or hand-written
//! input: the request parser and validator (`daemon::intake::parse`, every
//! MQTT payload goes through it), the bundle manifest parser and the config
//! parser.
//!
//! Each parser is fed the committed seed corpus in `tests/fixtures/fuzz/<target>/`,
//! random mutations of it (byte flips, insertions, deletions, splices: what
//! a coverage-guided fuzzer does, without needing a nightly toolchain),
//! arbitrary bytes or text, and generated structured input. The properties:
//! no panic, and every rejection is the documented kind of error (a request
//! error names its field; a config or manifest error names the offending key).
//!
//! Case counts keep this file to a few seconds in CI; a long run sets
//! `PROPTEST_CASES` (see docs/reliability.md). Failures are recorded in
//! `tests/fixtures/fuzz/regressions/` and replayed first on every run.

use std::fs;
use std::path::{Path, PathBuf};

use edgegen::bundle::Manifest;
use edgegen::config::{Config, Limits, MqttConfig};
use edgegen::daemon::intake::{self, Intake};
use edgegen::mqtt::messages::ErrorCode;
use edgegen::mqtt::topics::ReplyFilter;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// Cases per property when `PROPTEST_CASES` is not set. Each case takes
/// microseconds; 10 000 keep the whole file at a few seconds on two cores.
const DEFAULT_CASES: u32 = 10_000;

fn config(target: &str) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    let file = format!("tests/fixtures/fuzz/regressions/{target}.txt");
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(Box::leak(
        file.into_boxed_str(),
    ))));
    config
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| fs::read(p).expect("corpus file"))
        .collect();
    assert!(seeds.len() >= 10, "{target}: corpus too small");
    seeds
}

/// One edit of a byte string, positions taken modulo its length.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Copies a run of the input to another place (repeats structure such as `{`).
    Splice(usize, usize, usize),
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    let interesting = prop::sample::select(
        &[
            b'{', b'}', b'[', b']', b'"', b'\\', b':', b',', b'=', b'\n', b'#', b'/', b'.', b'0',
            b'-', b'e', 0x00, 0xff, 0xc3,
        ][..],
    );
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Flip(at, b)),
        (
            any::<usize>(),
            prop::collection::vec(prop_oneof![interesting, any::<u8>()], 1..8)
        )
            .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
        (any::<usize>(), 1usize..16).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(a, b, n)| Edit::Splice(a, b, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len();
        match edit {
            Edit::Flip(at, b) if len > 0 => bytes[at % len] = *b,
            Edit::Insert(at, new) => {
                let at = at % (len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Edit::Delete(at, n) if len > 0 => {
                let at = at % len;
                bytes.drain(at..(at + n).min(len));
            }
            Edit::Splice(from, to, n) if len > 0 => {
                let from = from % len;
                let run: Vec<u8> = bytes[from..(from + n).min(len)].to_vec();
                let to = to % (len + 1);
                bytes.splice(to..to, run);
            }
            _ => {}
        }
    }
    bytes
}

/// A seed of the corpus with a few random edits.
fn mutated(target: &str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    (
        prop::sample::select(seeds),
        prop::collection::vec(edit_strategy(), 0..6),
    )
        .prop_map(|(seed, edits)| apply(seed, &edits))
}

// ---------------------------------------------------------------- requests

fn limits() -> Limits {
    Limits {
        max_payload_bytes: 4096,
        ..Limits::default()
    }
}

fn replies() -> ReplyFilter {
    ReplyFilter::for_config(&MqttConfig::default())
}

/// What every parse must satisfy, whatever the payload.
fn check_intake(payload: &[u8], intake: &Intake) -> Result<(), TestCaseError> {
    let limits = limits();
    if let Some(id) = &intake.id {
        prop_assert!(intake::check_id(id).is_ok(), "routed to invalid id {id:?}");
    }
    if let Some(topic) = &intake.reply_to {
        prop_assert!(
            replies().check(topic).is_ok(),
            "routed to reply topic {topic:?}"
        );
    }
    match &intake.request {
        Ok(request) => {
            prop_assert!(payload.len() <= limits.max_payload_bytes);
            if let Some(id) = &request.id {
                // Ids become file names and topic levels.
                prop_assert!(intake::check_id(id).is_ok(), "accepted id {id:?}");
                prop_assert!(!id.contains(['/', '.', '\0', '\\']));
                prop_assert_eq!(intake.id.as_ref(), Some(id));
            }
            if let Some(topic) = &request.reply_to {
                prop_assert!(replies().check(topic).is_ok(), "accepted {topic:?}");
            }
        }
        Err(error) => match error.code {
            ErrorCode::TooLarge => {
                prop_assert!(payload.len() > limits.max_payload_bytes);
                prop_assert!(intake.id.is_none(), "oversized payloads are not parsed");
            }
            ErrorCode::InvalidRequest => {
                let field = error.field.as_deref();
                prop_assert!(field.is_some(), "no field named: {error:?}");
                let field = field.unwrap_or_default();
                prop_assert!(
                    error.message.starts_with(&format!("{field}: ")),
                    "message does not start with the field: {error:?}"
                );
            }
            other => prop_assert!(false, "unexpected code {other} at intake: {error:?}"),
        },
    }
    Ok(())
}

#[test]
fn request_corpus_replays() {
    for seed in corpus("request") {
        let intake = intake::parse(&seed, &limits(), &replies());
        if let Err(err) = check_intake(&seed, &intake) {
            panic!("{:?}: {err}", String::from_utf8_lossy(&seed));
        }
    }
}

/// JSON values of every kind, nested a few levels, with the numbers and
/// strings that break validators (extremes, non-ASCII, NUL, paths).
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![0u64, 1, 4, 64, 65, 512, 1 << 20, u32::MAX as u64 + 1])
            .prop_map(|n| json!(n)),
        "\\PC{0,40}".prop_map(Value::String),
        prop::sample::select(vec![
            "",
            "..",
            "../x",
            "a/b",
            "a\0b",
            "tiny-sd",
            "euler",
            "edgegen/reply/x",
            "#",
            "$SYS",
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn request_object() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        4 => prop::sample::select(intake::FIELDS).prop_map(str::to_string),
        1 => "\\PC{0,12}",
    ];
    prop::collection::vec((key, json_value()), 0..8).prop_map(|pairs| {
        // Written by hand so that keys may repeat, as a hostile client may send them.
        let body: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::Value::String(k.clone())))
            .collect();
        format!("{{{}}}", body.join(",")).into_bytes()
    })
}

proptest! {
    #![proptest_config(config("request"))]

    #[test]
    fn request_parser_survives_arbitrary_bytes(payload in prop::collection::vec(any::<u8>(), 0..600)) {
        let intake = intake::parse(&payload, &limits(), &replies());
        check_intake(&payload, &intake)?;
    }

    #[test]
    fn request_parser_survives_mutated_corpus(payload in mutated("request")) {
        let intake = intake::parse(&payload, &limits(), &replies());
        check_intake(&payload, &intake)?;
    }

    #[test]
    fn request_parser_names_the_field_of_generated_objects(payload in request_object()) {
        let intake = intake::parse(&payload, &limits(), &replies());
        check_intake(&payload, &intake)?;
        // An object that parses as JSON is never rejected as a whole: the error names a field.
        if let Err(error) = &intake.request {
            if error.code == ErrorCode::InvalidRequest && payload.len() <= limits().max_payload_bytes {
                prop_assert_ne!(error.field.as_deref(), Some("payload"), "{:?}", error);
            }
        }
    }
}

// ---------------------------------------------------------------- config

/// Every `[section] key` of the configuration, from the defaults.
fn config_keys() -> Vec<(String, String, toml::Value)> {
    let table = toml::Table::try_from(Config::default()).expect("config serializes");
    let mut keys = Vec::new();
    for (section, value) in table {
        if let toml::Value::Table(inner) = value {
            for (key, value) in inner {
                keys.push((section.clone(), key, value));
            }
        }
    }
    keys
}

/// A TOML value of another type than `like`.
fn wrong_type_for(like: &toml::Value) -> impl Strategy<Value = String> {
    let choices: Vec<&str> = match like {
        toml::Value::String(_) => vec!["12", "true", "[1, 2]", "{ a = 1 }", "1.5"],
        toml::Value::Integer(_) => vec!["\"12\"", "true", "[1]", "-1", "1.5", "{ a = 1 }"],
        toml::Value::Boolean(_) => vec!["\"yes\"", "1", "[true]"],
        _ => vec!["{ a = 1 }"],
    };
    prop::sample::select(choices).prop_map(str::to_string)
}

fn check_config_text(text: &str) -> Result<(), TestCaseError> {
    // The property is "no panic"; an error must carry a message.
    if let Err(err) = Config::from_toml(text) {
        let message = format!("{err:#}");
        prop_assert!(!message.is_empty(), "an error without a message");
    }
    Ok(())
}

#[test]
fn config_corpus_replays() {
    for seed in corpus("config") {
        let text = String::from_utf8_lossy(&seed);
        if let Err(err) = check_config_text(&text) {
            panic!("{text:?}: {err}");
        }
    }
}

proptest! {
    #![proptest_config(config("config"))]

    #[test]
    fn config_parser_survives_arbitrary_text(text in "\\PC{0,300}") {
        check_config_text(&text)?;
    }

    #[test]
    fn config_parser_survives_mutated_corpus(bytes in mutated("config")) {
        check_config_text(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn config_names_an_unknown_key(
        index in any::<prop::sample::Index>(),
        key in "[a-z][a-z_]{0,14}",
    ) {
        let keys = config_keys();
        let (section, ..) = index.get(&keys);
        prop_assume!(!keys.iter().any(|(s, k, _)| s == section && *k == key));
        let text = format!("[{section}]\n{key} = 1\n");
        let err = format!("{:#}", Config::from_toml(&text).expect_err("unknown key accepted"));
        prop_assert!(err.contains(&key), "{text}: {err}");
    }

    #[test]
    fn config_names_a_key_of_the_wrong_type(
        (section, key, value) in prop::sample::select(config_keys())
            .prop_flat_map(|(s, k, v)| (Just(s), Just(k), wrong_type_for(&v))),
    ) {
        // A path or a string accepts only strings; numbers and booleans are strict.
        let text = format!("[{section}]\n{key} = {value}\n");
        if let Err(err) = Config::from_toml(&text) {
            let err = format!("{err:#}");
            prop_assert!(err.contains(&key), "{text}: {err}");
        } else {
            prop_assert!(false, "{text}: accepted");
        }
    }
}

// ---------------------------------------------------------------- manifests

fn check_manifest_text(text: &str) -> Result<(), TestCaseError> {
    match Manifest::from_toml(text) {
        Ok(manifest) => {
            // What a parsed manifest promises: a GAN has its table, nothing else does.
            prop_assert_eq!(
                manifest.gan.is_some(),
                manifest.kind == edgegen::bundle::BundleKind::Gan
            );
        }
        Err(err) => {
            let message = format!("{err:#}");
            prop_assert!(!message.is_empty(), "an error without a message");
        }
    }
    Ok(())
}

#[test]
fn manifest_corpus_replays() {
    for seed in corpus("manifest") {
        let text = String::from_utf8_lossy(&seed);
        if let Err(err) = check_manifest_text(&text) {
            panic!("{text:?}: {err}");
        }
    }
}

const MANIFEST_TABLES: &[(&str, &[&str])] = &[
    ("", &["kind", "name", "description", "license"]),
    (
        "defaults",
        &[
            "steps",
            "guidance",
            "width",
            "height",
            "scheduler",
            "negative_prompt",
        ],
    ),
    (
        "gan",
        &[
            "latent_input",
            "latent_dim",
            "class_input",
            "classes",
            "text_input",
            "output",
            "output_range",
            "truncation",
        ],
    ),
];

proptest! {
    #![proptest_config(config("manifest"))]

    #[test]
    fn manifest_parser_survives_arbitrary_text(text in "\\PC{0,300}") {
        check_manifest_text(&text)?;
    }

    #[test]
    fn manifest_parser_survives_mutated_corpus(bytes in mutated("manifest")) {
        check_manifest_text(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn manifest_names_an_unknown_key(
        table in 0usize..MANIFEST_TABLES.len(),
        key in "[a-z][a-z_]{0,14}",
    ) {
        let (name, known) = MANIFEST_TABLES[table];
        prop_assume!(!known.contains(&key.as_str()) && !["defaults", "gan"].contains(&key.as_str()));
        let text = match name {
            "" => format!("{key} = 1\n"),
            "gan" => format!("kind = \"gan\"\n[gan]\nlatent_input = \"z\"\nlatent_dim = 4\n{key} = 1\n"),
            other => format!("[{other}]\n{key} = 1\n"),
        };
        let err = format!("{:#}", Manifest::from_toml(&text).expect_err("unknown key accepted"));
        prop_assert!(err.contains(&key), "{text}: {err}");
    }
}
