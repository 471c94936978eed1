//! Broken model bundles next to good ones: a truncated UNet, an overwritten
//! text encoder, a missing tokenizer file, a vocabulary that is not JSON, a
//! VAE decoder whose input has the wrong number of dimensions, and a GAN whose
//! manifest disagrees with its generator's latent size. The broken copies are
//! made from the fixture bundles at test time (nothing large is committed).
//!
//! `edgegen models list` must mark each one broken with the reason and still
//! exit 0; the daemon's retained `models` message must show the same; and the
//! daemon must keep serving the good models while answering a request for a
//! broken one with `model_error` naming the problem.

mod mqtt_support;

use std::fs;
use std::path::Path;
use std::process::Command;

use edgegen::mqtt::messages::{ErrorCode, JobState, ModelsMessage};
use mqtt_support::{assert_stored, Daemon, DaemonConfig, Mosquitto, Probe};

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A broken bundle: its id, and what the reason must mention (in `models
/// list`, the `models` message and the daemon's `model_error`).
struct Broken {
    id: &'static str,
    listed: &'static str,
    served: &'static str,
}

const BROKEN: &[Broken] = &[
    Broken {
        id: "truncated-unet",
        listed: "unet/model.onnx",
        served: "unet/model.onnx",
    },
    Broken {
        id: "corrupt-text-encoder",
        listed: "text_encoder/model.onnx",
        served: "text_encoder/model.onnx",
    },
    Broken {
        id: "missing-merges",
        listed: "missing tokenizer/merges.txt",
        served: "missing tokenizer/merges.txt",
    },
    Broken {
        id: "bad-vocab",
        listed: "vocab.json: not valid JSON",
        served: "vocab.json",
    },
    Broken {
        id: "wrong-rank-vae",
        listed:
            "vae_decoder/model.onnx: input 'input_ids' has 2 dimensions, the pipeline feeds it 4",
        served: "vae_decoder/model.onnx",
    },
    Broken {
        id: "gan-wrong-latent",
        listed: "takes 12 latent values, but edgegen.toml says latent_dim = 7",
        served: "generator/model.onnx",
    },
];

/// `good-sd`, `good-gan` and the broken bundles in `models`.
fn make_models(models: &Path) {
    let fixtures = mqtt_support::repo().join("tests/fixtures/bundles");
    copy_dir(&fixtures.join("tiny-sd"), &models.join("good-sd"));
    copy_dir(&fixtures.join("gan-class"), &models.join("good-gan"));
    for broken in BROKEN {
        let source = if broken.id.starts_with("gan") {
            "gan-class"
        } else {
            "tiny-sd"
        };
        copy_dir(&fixtures.join(source), &models.join(broken.id));
    }
    let file = |id: &str, relative: &str| models.join(id).join(relative);

    let unet = file("truncated-unet", "unet/model.onnx");
    let bytes = fs::read(&unet).expect("unet");
    fs::write(&unet, &bytes[..bytes.len() * 2 / 3]).expect("truncate");

    let encoder = file("corrupt-text-encoder", "text_encoder/model.onnx");
    let mut bytes = fs::read(&encoder).expect("text encoder");
    bytes[..256].fill(0xa5);
    fs::write(&encoder, bytes).expect("overwrite");

    fs::remove_file(file("missing-merges", "tokenizer/merges.txt")).expect("rm merges");

    let vocab = file("bad-vocab", "tokenizer/vocab.json");
    let bytes = fs::read(&vocab).expect("vocab");
    fs::write(&vocab, &bytes[..bytes.len() / 2]).expect("truncate vocab");

    fs::copy(
        file("wrong-rank-vae", "text_encoder/model.onnx"),
        file("wrong-rank-vae", "vae_decoder/model.onnx"),
    )
    .expect("swap vae");

    let manifest = file("gan-wrong-latent", "edgegen.toml");
    let text = fs::read_to_string(&manifest).expect("manifest");
    assert!(text.contains("latent_dim = 12"), "{text}");
    fs::write(&manifest, text.replace("latent_dim = 12", "latent_dim = 7")).expect("manifest");
}

#[test]
fn models_list_marks_broken_bundles_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("models");
    make_models(&models);
    let config = dir.path().join("edgegen.toml");
    fs::write(
        &config,
        format!(
            "[models]\ndir = \"{}\"\ndefault = \"good-sd\"\n",
            models.display()
        ),
    )
    .expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_edgegen"))
        .args(["models", "list", "--config"])
        .arg(&config)
        .env_remove("EDGEGEN_MODELS_DIR")
        .output()
        .expect("edgegen models list");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line_of = |id: &str| {
        stdout
            .lines()
            .find(|l| {
                l.split('\t')
                    .next()
                    .is_some_and(|first| first.starts_with(id))
            })
            .unwrap_or_else(|| panic!("no line for {id}:\n{stdout}"))
            .to_string()
    };
    assert!(line_of("good-sd").contains("\tdiffusion\t"), "{stdout}");
    assert!(line_of("good-gan").contains("\tgan\t"), "{stdout}");
    for broken in BROKEN {
        let line = line_of(broken.id);
        assert!(
            line.starts_with(&format!("{}\tbroken\t", broken.id)) && line.contains(broken.listed),
            "{}: expected broken with {:?}, got {line:?}",
            broken.id,
            broken.listed
        );
    }
}

#[test]
fn daemon_serves_good_models_and_refuses_broken_ones_with_model_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("models");
    make_models(&models);
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let mut config = DaemonConfig::new(&broker.url(), "broken");
    config.models_dir = Some(models.clone());
    config.default_model = "good-sd".into();
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    probe.subscribe(&format!("edgegen/{}/#", config.node));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    // The retained models message shows every bundle, the broken ones with why.
    let models_topic = topics.models();
    let announced: ModelsMessage = probe
        .wait("models message", mqtt_support::WAIT, |msgs| {
            msgs.iter().any(|m| m.topic == models_topic)
        })
        .iter()
        .find(|m| m.topic == models_topic)
        .expect("models message")
        .json();
    for broken in BROKEN {
        let entry = announced
            .models
            .iter()
            .find(|m| m.id == broken.id)
            .unwrap_or_else(|| panic!("{} not announced: {announced:?}", broken.id));
        assert_eq!(entry.kind, "broken", "{entry:?}");
        assert!(
            entry
                .error
                .as_deref()
                .is_some_and(|e| e.contains(broken.listed)),
            "{entry:?}"
        );
    }
    for good in ["good-sd", "good-gan"] {
        let entry = announced
            .models
            .iter()
            .find(|m| m.id == good)
            .expect("good model");
        assert_ne!(entry.kind, "broken", "{entry:?}");
    }

    // Requests for every broken model, with good ones in between.
    let mut ids = Vec::new();
    for (n, broken) in BROKEN.iter().enumerate() {
        let id = format!("broken-{n}");
        probe.publish(
            &topics.request(),
            format!(
                r#"{{"id":"{id}","prompt":"apple","model":"{}"}}"#,
                broken.id
            ),
        );
        ids.push(id);
        let good = format!("good-{n}");
        let model = if n % 2 == 0 { "good-sd" } else { "good-gan" };
        probe.publish(
            &topics.request(),
            format!(r#"{{"id":"{good}","prompt":"apple","model":"{model}"}}"#),
        );
        ids.push(good);
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let results = probe.results(&topics, &id_refs);
    for (n, broken) in BROKEN.iter().enumerate() {
        let result = &results[&format!("broken-{n}")];
        assert_eq!(
            result.state,
            Some(JobState::Failed),
            "{}: {result:?}",
            broken.id
        );
        let error = result.error.as_ref().expect("error");
        assert_eq!(
            error.code,
            ErrorCode::ModelError,
            "{}: {error:?}",
            broken.id
        );
        assert!(
            error.message.contains(broken.served),
            "{}: the message names the problem: {error:?}",
            broken.id
        );
        assert_stored(&results[&format!("good-{n}")]);
    }
}
