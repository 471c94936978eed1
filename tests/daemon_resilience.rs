//! The daemon under stress: the embedded broker with the Mosquitto command-line
//! clients, kill -9 with twenty accepted jobs, broker restarts while jobs run,
//! and SIGTERM. Everything is checked through MQTT messages and the files on
//! disk (sha256, exact), so there is no tolerance anywhere.

mod mqtt_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgegen::mqtt::messages::{JobResult, JobState, Status};
use mqtt_support::{
    assert_stored, edgegen_request, files_under, free_port, wait_for_port, wait_spool_empty,
    Daemon, DaemonConfig, Mosquitto, Probe, WAIT,
};

fn date_dir(daemon: &Daemon) -> PathBuf {
    daemon
        .output_dir()
        .join(chrono::Local::now().format("%Y-%m-%d").to_string())
}

/// Temporary files anywhere under the daemon's directory (output and state).
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".tmp"))
        })
        .collect()
}

#[test]
fn embedded_broker_serves_mosquitto_clients_and_edgegen_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut config = DaemonConfig::new("embedded", "kiosk");
    config.listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    wait_for_port(port, Duration::from_secs(60));
    let topics = daemon.topics();
    let port_text = port.to_string();

    // The retained "online" comes first, so once it is read the result subscription is in place.
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port_text,
            "-v",
            "-C",
            "2",
            "-W",
            "120",
        ])
        .args([
            "-t",
            &topics.availability(),
            "-t",
            &format!("edgegen/{}/job/+/result", daemon.config.node),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first message").expect("read");
    assert_eq!(first, format!("{} online", topics.availability()));

    // The command from the README, with the test's port.
    let published = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port_text,
            "-t",
            &topics.request(),
            "-m",
            "a red apple on a tree",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(published.success());
    let line = lines.next().expect("a result").expect("read");
    let (topic, json) = line.split_once(' ').expect("topic and payload");
    assert!(topic.ends_with("/result"), "{line}");
    let result: JobResult = serde_json::from_str(json).expect("result JSON");
    assert_stored(&result);
    assert!(sub.wait().expect("mosquitto_sub").success());

    // `edgegen request` talks MQTT 5 through the same address and saves the returned picture.
    let saved = dir.path().join("pear.png");
    let config = daemon.config_path.to_string_lossy();
    let args = [
        "--config", &config, "--prompt", "a pear", "--seed", "3", "--id", "cli-1",
    ];
    let output = edgegen_request(&args, &saved, "warn");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        saved.display().to_string()
    );
    let stored = std::fs::read(date_dir(&daemon).join("cli-1.png")).expect("stored picture");
    assert_eq!(
        std::fs::read(&saved).expect("saved picture"),
        stored,
        "saved bytes = stored bytes"
    );

    // An invalid request is a usage error (exit code 2) that names the field.
    let output = Command::new(env!("CARGO_BIN_EXE_edgegen"))
        .args(["request", "--config"])
        .arg(&daemon.config_path)
        .args(["--prompt", "x", "--steps", "0", "--timeout", "120"])
        .current_dir(dir.path())
        .env("EDGEGEN_LOG", "warn")
        .output()
        .expect("edgegen request");
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("steps"));
}

#[test]
fn kill_9_with_twenty_accepted_jobs_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let mut config = DaemonConfig::new(&broker.url(), "crash");
    config.queue = 32;
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    probe.subscribe(&format!("edgegen/{}/#", config.node));
    let mut daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    let ids: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        probe.publish(
            &topics.request(),
            format!(r#"{{"id":"{id}","prompt":"crash test {i}","seed":{i},"steps":20}}"#),
        );
    }
    // "queued" is published after the spool write and the acknowledgement: all 20 are accepted.
    let queued_topics: Vec<String> = ids.iter().map(|id| topics.job_status(id)).collect();
    probe.wait("20 accepted jobs", WAIT, |msgs| {
        queued_topics.iter().all(|t| {
            msgs.iter()
                .any(|m| &m.topic == t && m.json::<Status>().state == JobState::Queued)
        })
    });
    probe.wait("a job in the middle of its steps", WAIT, |msgs| {
        msgs.iter()
            .filter(|m| m.topic.ends_with("/status"))
            .any(|m| {
                let status: Status = m.json();
                status.state == JobState::Running && status.step >= 2
            })
    });
    daemon.kill9();
    let done_before = probe
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/result"))
        .count();
    assert!(done_before < 20, "the kill came before the end");
    // The broker publishes the Last Will.
    probe.wait_payload(&topics.availability(), "offline", 1);

    daemon.restart();
    let results = probe.results(&topics, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    // One more job after everything: any repeated result would have arrived by its end.
    probe.publish(&topics.request(), r#"{"id":"after","prompt":"x"}"#);
    probe.results(&topics, &["after"]);

    for (id, result) in &results {
        assert_stored(result);
        let answers = probe.on_topic(&topics.job_result(id));
        assert_eq!(
            answers.len(),
            1,
            "{id}: exactly one result, got {}",
            answers.len()
        );
    }
    let mut names: Vec<String> = files_under(&date_dir(&daemon))
        .iter()
        .filter_map(|p| p.to_str().map(str::to_string))
        .filter(|n| n.starts_with('c'))
        .collect();
    names.sort();
    let expected: Vec<String> = ids
        .iter()
        .flat_map(|id| [format!("{id}.json"), format!("{id}.png")])
        .collect();
    assert_eq!(names, expected, "exactly 20 pictures and 20 sidecars");
    wait_spool_empty(&daemon);
    assert!(
        temporaries(&daemon.dir).is_empty(),
        "temporary files left: {:?}",
        temporaries(&daemon.dir)
    );
    assert!(
        daemon.log().contains("re-queued"),
        "the restart took jobs from the spool"
    );
}

#[test]
fn broker_restarts_while_jobs_run_lose_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Mosquitto::start(&dir.path().join("broker"));
    let config = DaemonConfig::new(&broker.url(), "restart");
    // A persistent session, so results published while the probe reconnects wait for it.
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), true);
    probe.subscribe(&format!("edgegen/{}/job/+/result", config.node));
    probe.subscribe(&format!("edgegen/{}/availability", config.node));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    let request = |id: &str| format!(r#"{{"id":"{id}","prompt":"restart test","steps":20}}"#);
    for i in 0..6 {
        probe.publish(&topics.request(), request(&format!("r{i}")));
    }
    probe.results(&topics, &["r0"]);
    broker.restart();
    probe.publish(&topics.request(), request("r6"));
    probe.results(&topics, &["r6"]);
    // Second restart, with a request sent while the broker is down.
    broker.stop();
    probe.publish(&topics.request(), request("r7"));
    std::thread::sleep(Duration::from_millis(500));
    broker.restart();
    probe.publish(&topics.request(), request("r8"));

    let ids: Vec<String> = (0..9).map(|i| format!("r{i}")).collect();
    let results = probe.results(&topics, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    for result in results.values() {
        assert_stored(result);
    }
    assert!(
        daemon.log().matches("connected to MQTT broker").count() >= 3,
        "{}",
        daemon.log()
    );
}

#[test]
fn sigterm_publishes_offline_exits_0_and_keeps_the_running_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let config = DaemonConfig::new(&broker.url(), "sigterm");
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    probe.subscribe(&format!("edgegen/{}/#", config.node));
    let mut daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    for id in ["s1", "s2"] {
        let payload =
            format!(r#"{{"id":"{id}","prompt":"slow","steps":50,"width":128,"height":128}}"#);
        probe.publish(&topics.request(), payload);
    }
    let s1_status = topics.job_status("s1");
    probe.wait("s1 running", WAIT, |msgs| {
        msgs.iter()
            .any(|m| m.topic == s1_status && m.json::<Status>().state == JobState::Running)
    });
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "exit code\n{}", daemon.log());
    probe.wait_payload(&topics.availability(), "offline", 1);
    assert!(
        daemon.log().contains("stopped;"),
        "a clean stop, not the Last Will\n{}",
        daemon.log()
    );

    // Each job was either finished (result published) or is still in the spool.
    let spooled: Vec<String> = daemon
        .spool_files()
        .iter()
        .filter_map(|p| p.to_str().map(str::to_string))
        .collect();
    let mut finished = BTreeMap::new();
    for id in ["s1", "s2"] {
        let results = probe.on_topic(&topics.job_result(id));
        let in_spool = spooled
            .iter()
            .any(|name| name.ends_with(&format!("-{id}.json")));
        assert!(
            results.len() + usize::from(in_spool) == 1,
            "{id}: results {}, spooled {in_spool}",
            results.len()
        );
        finished.insert(id, results.len() == 1);
    }
    assert!(
        !finished["s2"],
        "the queued job was not started during shutdown"
    );

    // A fresh subscriber sees the retained "offline".
    let late = Probe::connect(broker.port, "late-subscriber", false);
    late.subscribe(&topics.availability());
    late.wait_payload(&topics.availability(), "offline", 1);

    daemon.restart();
    let results = probe.results(&topics, &["s1", "s2"]);
    for result in results.values() {
        assert_stored(result);
    }
}
