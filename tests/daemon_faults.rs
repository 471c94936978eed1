//! Faults around the daemon: a full disk (small tmpfs mounts for the output
//! and the state directory), a state directory that cannot be created at
//! start, and a broker that is not there yet.
//!
//! The disk-full tests mount tmpfs, which needs root (CI runs as root). Run
//! as another user they print why and do nothing.

mod common;
mod mqtt_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tmpfs::{fill, Tmpfs};
use edgegen::mqtt::messages::{ErrorCode, JobState};
use edgegen::mqtt::topics::Topics;
use mqtt_support::{
    assert_stored, files_under, free_port, wait_spool_empty, Daemon, DaemonConfig, Mosquitto, Probe,
};

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

#[test]
fn full_disk_gives_storage_full_without_partial_files_and_the_retry_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1 MiB each: far more than one spool record or picture (~14 kB), until filled.
    let Some(output) = Tmpfs::mount(&dir.path().join("output"), "size=1m") else {
        return;
    };
    let Some(state) = Tmpfs::mount(&dir.path().join("state"), "size=1m") else {
        return;
    };
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let mut config = DaemonConfig::new(&broker.url(), "diskfull");
    config.output_dir = Some(output.path.clone());
    config.state_dir = Some(state.path.clone());
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    probe.subscribe(&format!("edgegen/{}/#", config.node));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    // The output directory is full: the picture cannot be written.
    let filler = fill(&output.path);
    let request = r#"{"id":"full-out","prompt":"a full disk","seed":3}"#;
    probe.publish(&topics.request(), request);
    let result = &probe.results(&topics, &["full-out"])["full-out"];
    assert_eq!(result.state, Some(JobState::Failed), "{result:?}");
    let error = result.error.as_ref().expect("error");
    assert_eq!(error.code, ErrorCode::StorageFull, "{error:?}");
    assert_eq!(
        files_under(&output.path),
        [PathBuf::from("filler")],
        "nothing but the filler: no partial picture, no temporary"
    );
    wait_spool_empty(&daemon);

    // Space again: the same request (same id) now runs and is stored.
    fs::remove_file(&filler).expect("free space");
    assert_retry_is_stored(&probe, &topics, "full-out", request);

    // The state directory is full: the request cannot be spooled, so it is refused at once.
    // (Filled once the last spool file is gone, or its removal would free room.)
    wait_spool_empty(&daemon);
    let filler = fill(&state.path);
    probe.publish(
        &topics.request(),
        r#"{"id":"full-spool","prompt":"a full spool","seed":4}"#,
    );
    let result = &probe.results(&topics, &["full-spool"])["full-spool"];
    let error = result.error.as_ref().expect("error");
    assert_eq!(error.code, ErrorCode::StorageFull, "{error:?}");
    assert!(error.message.contains("spool"), "{error:?}");
    assert!(
        temporaries(&state.path).is_empty(),
        "{:?}",
        files_under(&state.path)
    );
    let queued = probe
        .on_topic(&topics.job_status("full-spool"))
        .into_iter()
        .filter(|m| m.text().contains("\"queued\""))
        .count();
    assert_eq!(queued, 0, "a job that could not be spooled was queued");

    fs::remove_file(&filler).expect("free space");
    assert_retry_is_stored(
        &probe,
        &topics,
        "full-spool",
        r#"{"id":"full-spool","prompt":"a full spool","seed":4}"#,
    );
    wait_spool_empty(&daemon);
    drop(daemon);
}

/// Starts a daemon that cannot create its state directory; returns its exit
/// code and log.
fn start_with_state_dir(dir: &Path, state_dir: PathBuf) -> (Option<i32>, String) {
    let mut config = DaemonConfig::new("mqtt://127.0.0.1:1", "nostate");
    config.state_dir = Some(state_dir);
    let mut daemon = Daemon::start(&dir.join("daemon"), config);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the daemon kept running:\n{}", daemon.log()));
    (status.code(), daemon.log())
}

#[test]
fn unusable_state_dir_at_start_is_a_clear_error_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Root ignores permission bits, so: a path below a regular file.
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"").expect("file");
    let (code, log) = start_with_state_dir(dir.path(), file.join("state"));
    assert_eq!(code, Some(1), "{log}");
    let spool = file.join("state/spool");
    assert!(
        log.contains(&format!(
            "error: creating spool directory {}",
            spool.display()
        )) && log.contains("Not a directory"),
        "{log}"
    );

    // And a read-only file system.
    let Some(readonly) = Tmpfs::mount(&dir.path().join("ro"), "ro,size=64k") else {
        return;
    };
    let (code, log) = start_with_state_dir(&dir.path().join("second"), readonly.path.join("state"));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("Read-only file system"), "{log}");
}

#[test]
fn unreachable_broker_at_start_is_retried_with_backoff_then_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = DaemonConfig::new(&format!("mqtt://127.0.0.1:{port}"), "nobroker");
    let node = config.node.clone();
    let daemon = Daemon::start(&dir.path().join("daemon"), config);

    // Five failed attempts: each says why, and the wait between them grows.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let delays = loop {
        let log = daemon.log();
        let delays: Vec<Duration> = log
            .lines()
            .filter_map(|l| l.split("retrying in ").nth(1))
            .filter_map(|d| parse_duration(d.trim()))
            .collect();
        if delays.len() >= 5 {
            assert!(
                log.contains(&format!("cannot reach the MQTT broker at 127.0.0.1:{port}"))
                    && log.contains("Connection refused"),
                "the log says why:\n{log}"
            );
            break delays;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "too few attempts:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        delays.windows(2).all(|w| w[1] >= w[0]) && delays[4] > delays[0] * 8,
        "back-off grows (100 ms doubling, up to 5 s): {delays:?}"
    );
    assert!(
        delays.iter().all(|d| *d <= Duration::from_secs(5)),
        "{delays:?}"
    );

    // The broker appears: the daemon connects and serves.
    let broker = Mosquitto::start_on(&dir.path().join("broker"), port, "");
    let probe = Probe::connect(broker.port, &format!("probe-{node}"), false);
    probe.subscribe(&format!("edgegen/{node}/#"));
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);
    probe.publish(
        &topics.request(),
        r#"{"id":"late","prompt":"finally","seed":5}"#,
    );
    assert_stored(&probe.results(&topics, &["late"])["late"]);
    daemon.wait_log("connected to MQTT broker", Duration::from_secs(1));
}

/// `100ms`, `1.6s`, `3.2s` as `Debug` of a `Duration` prints them.
fn parse_duration(text: &str) -> Option<Duration> {
    let number_end = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(number_end);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit.split_whitespace().next()? {
        "s" => value,
        "ms" => value / 1e3,
        "µs" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// Publishes `request` again and checks that this time its result is a stored picture.
fn assert_retry_is_stored(probe: &Probe, topics: &Topics, id: &str, request: &str) {
    let before = probe.messages().len();
    probe.publish(&topics.request(), request);
    let result_topic = topics.job_result(id);
    let retried = probe.wait("the retried result", mqtt_support::WAIT, |msgs| {
        msgs[before..].iter().any(|m| m.topic == result_topic)
    });
    let retried: edgegen::mqtt::messages::JobResult = retried[before..]
        .iter()
        .find(|m| m.topic == result_topic)
        .expect("result")
        .json();
    assert_stored(&retried);
}
