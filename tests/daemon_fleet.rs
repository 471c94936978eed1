//! Fleet mode against a real Mosquitto: three daemons share the group's
//! requests through `$share/<group>/edgegen/request`; one is killed with
//! `kill -9` mid-run and restarted, and every request is still answered
//! exactly once.

mod mqtt_support;

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use edgegen::mqtt::messages::{JobResult, JobState, Status};
use mqtt_support::{wait_spool_empty, Daemon, DaemonConfig, Mosquitto, Msg, Probe, WAIT};

const NODES: usize = 3;
const REQUESTS: usize = 60;

fn fleet_daemon(broker: &Mosquitto, dir: &std::path::Path, index: usize) -> Daemon {
    let mut config = DaemonConfig::new(&broker.url(), &format!("fleet{index}"));
    config.shared_group = "farm".into();
    Daemon::start(&dir.join(format!("node{index}")), config)
}

/// Complete spool records (not a write in progress).
fn spooled_jobs(daemon: &Daemon) -> usize {
    daemon
        .spool_files()
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .count()
}

/// Results on `edgegen/<node>/job/<id>/result`, as (node, result).
fn results(messages: &[Msg]) -> Vec<(String, JobResult)> {
    messages
        .iter()
        .filter_map(|m| {
            let levels: Vec<&str> = m.topic.split('/').collect();
            match levels.as_slice() {
                ["edgegen", node, "job", _, "result"] => Some((node.to_string(), m.json())),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn three_daemons_share_the_work_and_lose_nothing_when_one_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let probe = Probe::connect(broker.port, "fleet-probe", false);
    probe.subscribe("edgegen/+/availability");
    probe.subscribe("edgegen/+/job/+/result");
    let mut daemons: Vec<Daemon> = (0..NODES)
        .map(|i| fleet_daemon(&broker, dir.path(), i))
        .collect();
    for daemon in &daemons {
        probe.wait_payload(&daemon.topics().availability(), "online", 1);
    }

    // Enough steps that a job takes a noticeable moment, so the kill lands mid-run.
    for n in 0..REQUESTS {
        let request = format!(r#"{{"id":"fleet-{n:02}","prompt":"job {n}","steps":12}}"#);
        probe.publish("edgegen/request", request);
    }

    let victim = 1;
    let deadline = Instant::now() + WAIT;
    while spooled_jobs(&daemons[victim]) == 0 {
        assert!(
            Instant::now() < deadline,
            "node {victim} never spooled a job\n{}",
            daemons[victim].log()
        );
        thread::sleep(Duration::from_millis(5));
    }
    daemons[victim].kill9();
    let spooled_at_kill = spooled_jobs(&daemons[victim]);
    assert!(spooled_at_kill > 0);
    thread::sleep(Duration::from_millis(500));
    daemons[victim].restart();

    let all_answered = |messages: &[Msg]| {
        let answered: std::collections::BTreeSet<String> =
            results(messages).into_iter().map(|(_, r)| r.id).collect();
        answered.len() == REQUESTS
    };
    probe.wait("a result for every request", WAIT * 2, all_answered);
    for daemon in &daemons {
        wait_spool_empty(daemon);
    }
    // Late duplicates would arrive within moments of the last result.
    thread::sleep(Duration::from_millis(500));

    let mut per_id: BTreeMap<String, Vec<(String, JobResult)>> = BTreeMap::new();
    for (node, result) in results(&probe.messages()) {
        per_id
            .entry(result.id.clone())
            .or_default()
            .push((node, result));
    }
    assert_eq!(per_id.len(), REQUESTS);
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (id, answers) in &per_id {
        assert_eq!(
            answers.len(),
            1,
            "{id} answered {} times: {answers:?}",
            answers.len()
        );
        let (node, result) = &answers[0];
        assert_eq!(result.state, Some(JobState::Done), "{id}: {result:?}");
        *per_node.entry(node.clone()).or_default() += 1;
    }
    assert_eq!(
        per_node.len(),
        NODES,
        "every daemon takes work: {per_node:?}"
    );
    assert!(
        daemons[victim].log().contains("re-queued"),
        "the restarted node finishes its spooled jobs\n{}",
        daemons[victim].log()
    );
}

#[test]
fn a_busy_node_leaves_fleet_requests_with_the_broker_until_it_can_start_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let probe = Probe::connect(broker.port, "fleet-hold-probe", false);
    probe.subscribe("edgegen/+/job/+/#");
    let daemon = fleet_daemon(&broker, dir.path(), 0);
    probe.subscribe(&daemon.topics().availability());
    probe.wait_payload(&daemon.topics().availability(), "online", 1);

    for n in 0..8 {
        let request = format!(r#"{{"id":"hold-{n}","prompt":"job {n}","steps":12}}"#);
        probe.publish("edgegen/request", request);
    }
    probe.wait("eight results", WAIT, |m| results(m).len() == 8);
    // Taken only while at most one job is ahead: a queue position above 1
    // would mean the node accepted work it could not start soon.
    let positions: Vec<usize> = probe
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/status"))
        .map(|m| m.json::<Status>())
        .filter(|s| s.state == JobState::Queued)
        .map(|s| s.queue_position)
        .collect();
    assert_eq!(positions.len(), 8, "one queued status per request");
    assert!(
        positions.iter().all(|&p| p <= 1),
        "queue positions {positions:?}"
    );
}

#[test]
fn edgegen_request_with_fleet_gets_the_picture_from_whichever_node_took_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let probe = Probe::connect(broker.port, "fleet-cli-probe", false);
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| fleet_daemon(&broker, dir.path(), i))
        .collect();
    for daemon in &daemons {
        probe.subscribe(&daemon.topics().availability());
        probe.wait_payload(&daemon.topics().availability(), "online", 1);
    }
    let saved = dir.path().join("fleet.png");
    let url = broker.url();
    let args = [
        "--fleet",
        "--broker",
        &url,
        "--prompt",
        "a blue car",
        "--id",
        "cli-fleet",
    ];
    let output = mqtt_support::edgegen_request(&args, &saved, "info");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let png = std::fs::read(&saved).expect("saved picture");
    let node = daemons
        .iter()
        .find(|d| stderr.contains(&format!("done by node '{}'", d.config.node)))
        .unwrap_or_else(|| panic!("no node named in: {stderr}"));
    let stored = mqtt_support::files_under(&node.output_dir())
        .into_iter()
        .find(|p| p.ends_with("cli-fleet.png"))
        .expect("stored on the node that answered");
    assert_eq!(
        std::fs::read(node.output_dir().join(stored)).expect("read"),
        png
    );
}
