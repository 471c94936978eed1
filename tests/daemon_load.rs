//! A burst of requests against one daemon with `limits.queue = 16` and the
//! tiny model: every request must get exactly one result, `done` or `busy`,
//! none lost and none doubled; every `done` is stored; the spool ends empty;
//! resident memory stays flat. The run prints its throughput (the figures in
//! docs/reliability.md come from it).
//!
//! The burst is 1000 requests; `EDGEGEN_LOAD_REQUESTS` sets another size.

mod mqtt_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgegen::mqtt::messages::{ErrorCode, JobResult, JobState};
use mqtt_support::{
    assert_stored, wait_spool_empty, warm_up, Daemon, DaemonConfig, Mosquitto, Probe,
};
use rumqttc::v5::mqttbytes::QoS;

/// Allowed growth of the daemon's resident memory over the burst. Measured
/// growth is a few MiB (queue of 16, results published as they come); a
/// request kept per arrival (~200 bytes payload plus a spool record, routes
/// and a result) would still fit in this for 1000 requests, but unbounded
/// per-request buffers (e.g. each result kept until its PUBACK and never
/// freed) would not.
const RSS_GROWTH_KIB: u64 = 24 * 1024;

fn burst_size() -> usize {
    std::env::var("EDGEGEN_LOAD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[test]
fn burst_of_requests_each_get_exactly_one_result() {
    let requests = burst_size();
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let mut config = DaemonConfig::new(&broker.url(), "load");
    config.queue = 16;
    let node = config.node.clone();
    let probe = Probe::connect(broker.port, &format!("probe-{node}"), false);
    // QoS 0 on the way back: the probe sends no PUBACKs, so its own publishing is not slowed.
    probe.subscribe_qos(&format!("edgegen/{node}/job/+/result"), QoS::AtMostOnce);
    probe.subscribe(&format!("edgegen/{node}/availability"));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    warm_up(&probe, &topics);
    let rss_before = daemon.rss_kib();

    let ids: Vec<String> = (0..requests).map(|n| format!("load-{n:05}")).collect();
    let started = Instant::now();
    for (n, id) in ids.iter().enumerate() {
        probe.publish(
            &topics.request(),
            format!(r#"{{"id":"{id}","prompt":"a burst, number {n}","seed":{n}}}"#),
        );
    }
    let published = started.elapsed();
    let wanted: Vec<String> = ids.iter().map(|id| topics.job_result(id)).collect();
    let prefix = format!("edgegen/{node}/job/load-");
    let messages = probe.wait(
        &format!("{requests} results"),
        Duration::from_secs(600),
        |msgs| msgs.iter().filter(|m| m.topic.starts_with(&prefix)).count() >= requests,
    );
    let answered = started.elapsed();
    // Anything doubled would arrive right behind; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    let messages = {
        let later = probe.messages();
        assert!(later.len() >= messages.len());
        later
    };
    let rss_after = daemon.rss_kib();

    let mut per_id: BTreeMap<&str, Vec<JobResult>> = BTreeMap::new();
    for m in messages.iter().filter(|m| m.topic.starts_with(&prefix)) {
        let result: JobResult = m.json();
        let id = ids
            .iter()
            .find(|id| topics.job_result(id) == m.topic)
            .unwrap_or_else(|| panic!("result for an unknown job: {}", m.topic));
        assert_eq!(&result.id, id);
        per_id.entry(id.as_str()).or_default().push(result);
    }
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !per_id.contains_key(id.as_str()))
        .collect();
    assert!(missing.is_empty(), "{} lost: {missing:?}", missing.len());
    let doubled: Vec<_> = per_id
        .iter()
        .filter(|(_, r)| r.len() != 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(doubled.is_empty(), "more than one result: {doubled:?}");
    assert_eq!(wanted.len(), per_id.len());

    let (mut done, mut busy) = (0, 0);
    for results in per_id.values() {
        let result = &results[0];
        match (result.state, result.error.as_ref().map(|e| e.code)) {
            (Some(JobState::Done), None) => {
                assert_stored(result);
                done += 1;
            }
            (Some(JobState::Failed), Some(ErrorCode::Busy)) => busy += 1,
            other => panic!("{}: neither done nor busy: {other:?} {result:?}", result.id),
        }
    }
    assert_eq!(done + busy, requests);
    // The first 16 fill the queue, so at least that many run.
    assert!(done >= 16, "only {done} done");
    wait_spool_empty(&daemon);
    assert!(
        rss_after <= rss_before + RSS_GROWTH_KIB,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    let seconds = answered.as_secs_f64();
    eprintln!(
        "load: {requests} requests published in {:.2} s, all answered after {seconds:.2} s \
         ({:.0} answers/s): {done} done ({:.1} pictures/s), {busy} busy, 0 lost, 0 doubled; \
         RSS {rss_before} KiB before, {rss_after} KiB after",
        published.as_secs_f64(),
        requests as f64 / seconds,
        done as f64 / seconds,
    );
}
