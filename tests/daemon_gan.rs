//! A GAN bundle served by `edgegen serve` over a real Mosquitto: the same
//! request JSON (`class` or a prompt naming one class), the same storage and
//! result messages as diffusion, and diffusion-only fields rejected by name.

mod mqtt_support;

use edgegen::mqtt::messages::{ErrorCode, JobState};
use mqtt_support::{assert_stored, Daemon, DaemonConfig, Mosquitto, Probe};

#[test]
fn gan_requests_generate_over_mqtt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let config = DaemonConfig::new(&broker.url(), "gan");
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    probe.subscribe(&format!("edgegen/{}/#", config.node));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    probe.publish(
        &topics.request(),
        r#"{"id":"gan-class","model":"scenes-gan","class":"red apple","seed":3}"#,
    );
    probe.publish(
        &topics.request(),
        r#"{"id":"gan-prompt","model":"scenes-gan","prompt":"a blue car","seed":3}"#,
    );
    probe.publish(
        &topics.request(),
        r#"{"id":"gan-steps","model":"scenes-gan","class":"red apple","steps":4}"#,
    );
    probe.publish(
        &topics.request(),
        r#"{"id":"gan-unknown","model":"scenes-gan","class":"pink whale"}"#,
    );
    let results = probe.results(
        &topics,
        &["gan-class", "gan-prompt", "gan-steps", "gan-unknown"],
    );

    for id in ["gan-class", "gan-prompt"] {
        let result = &results[id];
        assert_stored(result);
        assert_eq!(result.model.as_deref(), Some("scenes-gan"));
        assert_eq!((result.width, result.height), (Some(64), Some(64)));
        let sidecar: serde_json::Value = serde_json::from_slice(
            &std::fs::read(result.sidecar.as_deref().expect("sidecar")).expect("read sidecar"),
        )
        .expect("sidecar JSON");
        let class = if id == "gan-class" {
            "red apple"
        } else {
            "blue car"
        };
        assert_eq!(sidecar["settings"]["class"], class, "{sidecar}");
    }
    for (id, field) in [("gan-steps", "steps"), ("gan-unknown", "class")] {
        let result = &results[id];
        assert_eq!(result.state, Some(JobState::Failed), "{result:?}");
        let error = result.error.as_ref().expect("error body");
        assert_eq!(error.code, ErrorCode::InvalidRequest, "{result:?}");
        assert!(error.message.contains(field), "{}", error.message);
    }
}
