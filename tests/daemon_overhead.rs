//! Measures what the daemon adds to a generation: end-to-end MQTT round trip
//! (publish → result received) minus the generation time the result reports.
//! A measurement, not a check, so it is ignored by default:
//!
//! ```sh
//! cargo test --release --test daemon_overhead -- --ignored --nocapture
//! ```
//!
//! `EDGEGEN_TEST_BIN=target/release/edgegen cargo test --test daemon_overhead -- --ignored --nocapture`
//! measures an already built daemon binary instead of building the test in release.

mod mqtt_support;

use std::time::Instant;

use edgegen::mqtt::messages::{JobResult, ResultTimings};
use mqtt_support::{Daemon, DaemonConfig, Mosquitto, Probe, WAIT};
use rumqttc::v5::mqttbytes::QoS;

const WARM_UP: usize = 5;
const RUNS: usize = 50;

struct Row {
    round_trip_ms: f64,
    timings: ResultTimings,
}

fn report(name: &str, rows: &[Row], value: impl Fn(&Row) -> f64) {
    let mut values: Vec<f64> = rows.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name:<30} median {:8.2} ms   p90 {:8.2} ms   min {:8.2} ms",
        at(0.5),
        at(0.9),
        values[0]
    );
}

#[test]
#[ignore]
fn daemon_overhead_per_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let mut config = DaemonConfig::new(&broker.url(), "overhead");
    config.threads = 0;
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    // QoS 0 towards the probe: it sends no acknowledgements that could hold
    // back its next request (rumqttc does not disable Nagle's algorithm).
    probe.subscribe_qos(
        &format!("edgegen/{}/job/+/result", config.node),
        QoS::AtMostOnce,
    );
    probe.subscribe(&format!("edgegen/{}/availability", config.node));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    let mut rows = Vec::new();
    for i in 0..WARM_UP + RUNS {
        let id = format!("o{i}");
        let topic = topics.job_result(&id);
        let started = Instant::now();
        // The bundled default model with its defaults (4 steps, 64x64).
        probe.publish(
            &topics.request(),
            format!(r#"{{"id":"{id}","prompt":"a red apple on a tree","seed":{i}}}"#),
        );
        let messages = probe.wait(&id, WAIT, |msgs| msgs.iter().any(|m| m.topic == topic));
        let round_trip_ms = started.elapsed().as_secs_f64() * 1e3;
        let result: JobResult = messages
            .iter()
            .find(|m| m.topic == topic)
            .expect("result")
            .json();
        if i >= WARM_UP {
            let timings = result.timings.expect("timings");
            rows.push(Row {
                round_trip_ms,
                timings,
            });
        }
    }
    println!(
        "{RUNS} sequential requests (after {WARM_UP} warm-up), tiny-random-sd defaults \
         (4 steps, 64x64, guidance 7.5), Mosquitto on loopback"
    );
    report("round trip", &rows, |r| r.round_trip_ms);
    report("generation (total_ms)", &rows, |r| r.timings.total_ms);
    report("overhead = round trip - gen", &rows, |r| {
        r.round_trip_ms - r.timings.total_ms
    });
    report("  intake_ms (check + spool)", &rows, |r| {
        r.timings.intake_ms.unwrap_or(0.0)
    });
    report("  queue_ms", &rows, |r| r.timings.queue_ms.unwrap_or(0.0));
    report("  store_ms (PNG + sidecar)", &rows, |r| {
        r.timings.store_ms.unwrap_or(0.0)
    });
    report("  rest (MQTT, hand-offs)", &rows, |r| {
        let t = &r.timings;
        r.round_trip_ms
            - t.total_ms
            - t.intake_ms.unwrap_or(0.0)
            - t.queue_ms.unwrap_or(0.0)
            - t.store_ms.unwrap_or(0.0)
    });
}
