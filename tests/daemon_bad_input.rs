//! Hostile and malformed requests against one `edgegen serve` over a real
//! Mosquitto: invalid UTF-8, deep nesting, huge and negative numbers, NaN and
//! infinity, zero and giant sizes, path-like ids, oversized prompts, unknown
//! models, wrong types, duplicate keys, empty payloads, reply topics outside
//! `mqtt.reply_filter`, and retained junk on the request topic at start-up.
//!
//! Each request must get exactly one `failed` result with the documented code
//! (and the field, where the error is about one), nothing may be written to
//! the output directory or left in the spool, the daemon must stay up and
//! serve a valid request afterwards, and its memory must stay bounded.
//!
//! Every case carries an MQTT 5 response topic with the case name as
//! correlation data, so a result can be matched to its case even when the
//! payload has no usable id (then the daemon assigns one and the result also
//! goes to `job/<assigned id>/result`, which the test counts too).

mod mqtt_support;

use std::collections::BTreeMap;
use std::time::Duration;

use edgegen::mqtt::messages::{ErrorCode, JobResult, JobState};
use mqtt_support::{
    assert_stored, files_under, wait_spool_empty, warm_up, Daemon, DaemonConfig, Mosquitto, Probe,
    WAIT,
};

/// Growth of the daemon's resident memory allowed over the whole table
/// (measured: about 1.5 MiB, from a 64 MiB start). The table sends 3.3 MB of
/// payloads (2 MiB undeliverable, one of 1 MB); the allocator keeps some
/// freed memory, hence the margin, but keeping every payload would not fit.
const RSS_GROWTH_KIB: u64 = 16 * 1024;

struct Case {
    name: String,
    payload: Vec<u8>,
    code: ErrorCode,
    field: Option<&'static str>,
    /// MQTT 5 response topic, when not the case's own reply topic.
    response_topic: Option<String>,
}

fn case(
    name: &str,
    payload: impl Into<Vec<u8>>,
    code: ErrorCode,
    field: Option<&'static str>,
) -> Case {
    Case {
        name: name.to_string(),
        payload: payload.into(),
        code,
        field,
        response_topic: None,
    }
}

fn invalid(name: &str, payload: impl Into<Vec<u8>>, field: &'static str) -> Case {
    case(name, payload, ErrorCode::InvalidRequest, Some(field))
}

fn json_with(field: &str, value: &str) -> String {
    format!(r#"{{"prompt":"a hostile request","{field}":{value}}}"#)
}

fn cases(node: &str) -> Vec<Case> {
    use ErrorCode::{TooLarge, UnknownModel};
    let deep_array = format!(
        r#"{{"prompt":{}"x"{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_object = format!(r#"{}1{}"#, r#"{"a":"#.repeat(5_000), "}".repeat(5_000));
    let deep_in_field = format!(r#"{{"steps":{}1{}}}"#, "[".repeat(100), "]".repeat(100));
    let one_megabyte = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(1_000_000));
    let just_over = format!(r#"{{"prompt":"{}"}}"#, "y".repeat(65_536 - 13 + 1));
    assert_eq!(just_over.len(), 65_537);
    let long_prompt = json_with("negative_prompt", &format!("\"{}\"", "n".repeat(201)));
    let mut cases = vec![
        // Encoding.
        invalid("utf8-bare", b"a red \xff apple".to_vec(), "payload"),
        invalid(
            "utf8-in-json",
            b"{\"prompt\":\"\xc3\x28\"}".to_vec(),
            "payload",
        ),
        invalid(
            "utf8-lone-continuation",
            b"\x80\x80\x80".to_vec(),
            "payload",
        ),
        invalid(
            "utf8-overlong-nul",
            b"{\"prompt\":\"\xc0\x80\"}".to_vec(),
            "payload",
        ),
        invalid("json-lone-surrogate", r#"{"prompt":"\ud800"}"#, "payload"),
        // Structure.
        invalid("deep-array", deep_array, "payload"),
        invalid("deep-object", deep_object, "payload"),
        invalid("deep-in-field", deep_in_field, "steps"),
        invalid("empty", "", "prompt"),
        invalid("whitespace", " \n\t\r ", "prompt"),
        invalid("json-array", r#"["a prompt"]"#, "payload"),
        invalid("json-empty-array", "[]", "payload"),
        invalid("truncated", r#"{"prompt":"a"#, "payload"),
        invalid("trailing-garbage", r#"{"prompt":"a"} and more"#, "payload"),
        invalid("two-objects", r#"{"prompt":"a"}{"prompt":"b"}"#, "payload"),
        invalid("single-quotes", r#"{'prompt':'a'}"#, "payload"),
        invalid("trailing-comma", r#"{"prompt":"a",}"#, "payload"),
        invalid("comment", r#"{"prompt":"a" /* hi */}"#, "payload"),
        // Numbers.
        invalid("nan", r#"{"prompt":"a","guidance":NaN}"#, "payload"),
        invalid(
            "infinity",
            r#"{"prompt":"a","guidance":Infinity}"#,
            "payload",
        ),
        invalid(
            "minus-infinity",
            r#"{"prompt":"a","guidance":-Infinity}"#,
            "payload",
        ),
        invalid("float-overflow", json_with("guidance", "1e400"), "payload"),
        invalid("nan-string", json_with("guidance", "\"NaN\""), "guidance"),
        invalid("guidance-huge", json_with("guidance", "1e308"), "guidance"),
        invalid(
            "guidance-negative",
            json_with("guidance", "-7.5"),
            "guidance",
        ),
        invalid(
            "steps-huge-int",
            json_with("steps", "99999999999999999999999"),
            "steps",
        ),
        invalid("steps-zero", json_with("steps", "0"), "steps"),
        invalid(
            "steps-one-billion",
            json_with("steps", "1000000000"),
            "steps",
        ),
        invalid("steps-1e9", json_with("steps", "1e9"), "steps"),
        invalid("steps-negative", json_with("steps", "-1"), "steps"),
        invalid("steps-fraction", json_with("steps", "2.5"), "steps"),
        invalid("seed-negative", json_with("seed", "-42"), "seed"),
        invalid(
            "seed-over-u64",
            json_with("seed", "18446744073709551616"),
            "seed",
        ),
        invalid("seed-float", json_with("seed", "1.5"), "seed"),
        // Sizes.
        invalid("width-zero", json_with("width", "0"), "width"),
        invalid("height-zero", json_with("height", "0"), "height"),
        invalid("width-negative", json_with("width", "-64"), "width"),
        invalid("width-giant", json_with("width", "1048576"), "width"),
        invalid("width-over-u32", json_with("width", "4294967296"), "width"),
        invalid("width-odd", json_with("width", "63"), "width"),
        invalid(
            "size-giant",
            r#"{"prompt":"a","width":65536,"height":65536}"#,
            "width",
        ),
        invalid("batch-zero", json_with("batch", "0"), "batch"),
        invalid("batch-million", json_with("batch", "1000000"), "batch"),
        // Ids: they become file names and topic levels.
        invalid("id-slash", r#"{"id":"a/b","prompt":"a"}"#, "id"),
        invalid("id-dotdot", r#"{"id":"..","prompt":"a"}"#, "id"),
        invalid(
            "id-traversal",
            r#"{"id":"../../etc/passwd","prompt":"a"}"#,
            "id",
        ),
        invalid("id-backslash", r#"{"id":"..\\x","prompt":"a"}"#, "id"),
        invalid("id-nul", r#"{"id":"a\u0000b","prompt":"a"}"#, "id"),
        invalid("id-empty", r#"{"id":"","prompt":"a"}"#, "id"),
        invalid("id-space", r#"{"id":"a b","prompt":"a"}"#, "id"),
        invalid("id-wildcard", r#"{"id":"a+#","prompt":"a"}"#, "id"),
        invalid("id-unicode", r#"{"id":"jöb","prompt":"a"}"#, "id"),
        invalid("id-dollar", r#"{"id":"$SYS","prompt":"a"}"#, "id"),
        invalid(
            "id-65-chars",
            format!(r#"{{"id":"{}","prompt":"a"}}"#, "i".repeat(65)),
            "id",
        ),
        invalid("id-number", r#"{"id":42,"prompt":"a"}"#, "id"),
        // Sizes of text.
        case("prompt-1mb", one_megabyte, TooLarge, None),
        case("payload-limit-plus-one", just_over, TooLarge, None),
        invalid(
            "prompt-201-chars",
            json_with("prompt", &format!("\"{}\"", "p".repeat(201))),
            "prompt",
        ),
        invalid("bare-prompt-201-chars", "q".repeat(201), "prompt"),
        invalid("negative-prompt-201-chars", long_prompt, "negative_prompt"),
        // Models.
        case(
            "model-unknown",
            json_with("model", "\"no-such-model\""),
            UnknownModel,
            Some("model"),
        ),
        invalid(
            "model-traversal",
            json_with("model", "\"../models/tiny-random-sd\""),
            "model",
        ),
        invalid("model-absolute", json_with("model", "\"/etc\""), "model"),
        invalid("model-hidden", json_with("model", "\".git\""), "model"),
        invalid("model-type", json_with("model", "5"), "model"),
        // Types.
        invalid("prompt-array", r#"{"prompt":["a"]}"#, "prompt"),
        invalid("prompt-number", r#"{"prompt":5}"#, "prompt"),
        invalid(
            "negative-object",
            json_with("negative_prompt", "{}"),
            "negative_prompt",
        ),
        invalid("steps-string", json_with("steps", "\"4\""), "steps"),
        invalid("steps-bool", json_with("steps", "true"), "steps"),
        invalid("seed-string", json_with("seed", "\"42\""), "seed"),
        invalid(
            "return-image-string",
            json_with("return_image", "\"yes\""),
            "return_image",
        ),
        invalid(
            "return-image-number",
            json_with("return_image", "1"),
            "return_image",
        ),
        invalid("scheduler-number", json_with("scheduler", "1"), "scheduler"),
        invalid(
            "scheduler-unknown",
            json_with("scheduler", "\"warp\""),
            "scheduler",
        ),
        invalid(
            "class-on-diffusion",
            json_with("class", "\"apple\""),
            "class",
        ),
        // Keys.
        invalid(
            "duplicate-prompt",
            r#"{"prompt":"a","prompt":"b"}"#,
            "prompt",
        ),
        invalid(
            "duplicate-id",
            r#"{"id":"dup-a","prompt":"a","id":"dup-b"}"#,
            "id",
        ),
        invalid(
            "duplicate-steps",
            r#"{"prompt":"a","steps":2,"steps":3}"#,
            "steps",
        ),
        invalid("unknown-field", json_with("colour", "\"red\""), "colour"),
        invalid("empty-key", r#"{"prompt":"a","":1}"#, ""),
        invalid("path-key", json_with("../../x", "1"), "../../x"),
        // Where answers go.
        invalid(
            "reply-to-wildcard",
            json_with("reply_to", "\"edgegen/reply/#\""),
            "reply_to",
        ),
        invalid(
            "reply-to-outside",
            json_with("reply_to", "\"home/door/set\""),
            "reply_to",
        ),
        invalid(
            "reply-to-own-request-topic",
            json_with("reply_to", &format!("\"edgegen/{node}/request\"")),
            "reply_to",
        ),
        invalid(
            "reply-to-sys",
            json_with("reply_to", "\"$SYS/broker/x\""),
            "reply_to",
        ),
        invalid("reply-to-empty", json_with("reply_to", "\"\""), "reply_to"),
    ];
    // An MQTT 5 response topic outside the reply filter: refused, answered on the job topic only.
    let mut outside = invalid(
        "response-topic-outside",
        r#"{"id":"resp-out","prompt":"a"}"#,
        "response_topic",
    );
    outside.response_topic = Some("home/door/set".into());
    cases.push(outside);
    cases
}

fn reply_topic(case: &str) -> String {
    format!("edgegen/reply/bad/{case}")
}

#[test]
fn hostile_requests_each_get_one_failed_result_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let config = DaemonConfig::new(&broker.url(), "bad");
    let node = config.node.clone();
    let probe = Probe::connect(broker.port, &format!("probe-{node}"), false);
    probe.subscribe(&format!("edgegen/{node}/#"));
    probe.subscribe("edgegen/reply/#");
    probe.subscribe("home/#");

    // Retained junk (and a retained valid prompt) on the request topic before
    // the daemon starts: a retained message is a replay, never a new request,
    // so none of it may run or be answered.
    let request_topic = format!("edgegen/{node}/request");
    probe.publish_retained(&request_topic, b"\xff\xfe junk".to_vec());
    probe.publish_retained(
        &request_topic,
        r#"{"id":"retained-1","prompt":"a stale request"}"#,
    );

    let mut daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);

    // A valid request first: the model is loaded before memory is measured.
    warm_up(&probe, &topics);
    let rss_before = daemon.rss_kib();
    let files_before = files_under(&daemon.output_dir());

    // Over the daemon's MQTT packet limit (1 MiB here): the broker never
    // delivers it, so no answer is possible; it must not disturb anything.
    probe.publish_with_response(
        &topics.request(),
        vec![b'z'; 2 << 20],
        &reply_topic("over-packet-limit"),
        b"over-packet-limit",
    );
    let cases = cases(&node);
    assert!(cases.len() >= 60, "{} cases", cases.len());
    for case in &cases {
        let topic = case
            .response_topic
            .clone()
            .unwrap_or_else(|| reply_topic(&case.name));
        probe.publish_with_response(
            &topics.request(),
            case.payload.clone(),
            &topic,
            case.name.as_bytes(),
        );
    }
    // Requests on one topic are handled in order: once this one is done, every case was answered.
    probe.publish(
        &topics.request(),
        r#"{"id":"after","prompt":"a quince","seed":2}"#,
    );
    let after = probe.results(&topics, &["after"]);
    assert_stored(&after["after"]);
    let rss_after = daemon.rss_kib();

    let messages = probe.messages();
    let mut failures = Vec::new();
    for case in &cases {
        let expected_topic = case
            .response_topic
            .clone()
            .unwrap_or_else(|| reply_topic(&case.name));
        let answers: Vec<_> = messages
            .iter()
            .filter(|m| {
                m.topic == expected_topic && m.correlation.as_deref() == Some(case.name.as_bytes())
            })
            .collect();
        let result: JobResult = match (case.response_topic.is_some(), answers.as_slice()) {
            // Refused response topic: the answer is on the job topic only.
            (true, []) => match messages
                .iter()
                .find(|m| m.topic == topics.job_result("resp-out"))
            {
                Some(m) => m.json(),
                None => {
                    failures.push(format!("{}: no result on the job topic", case.name));
                    continue;
                }
            },
            (false, [one]) => one.json(),
            (_, found) => {
                failures.push(format!("{}: {} answers", case.name, found.len()));
                continue;
            }
        };
        let error = result.error.clone();
        let got = error.as_ref().map(|e| (e.code, e.field.as_deref()));
        if result.state != Some(JobState::Failed) || got != Some((case.code, case.field)) {
            failures.push(format!(
                "{}: expected {:?} {:?}, got {:?} {:?}",
                case.name, case.code, case.field, result.state, error
            ));
            continue;
        }
        if let (Some(field), Some(error)) = (case.field, &error) {
            // Request errors start with the field; others (unknown_model) name it somewhere.
            let named = match error.code {
                ErrorCode::InvalidRequest => error.message.starts_with(&format!("{field}: ")),
                _ => error.message.contains(field),
            };
            if !named {
                failures.push(format!(
                    "{}: message does not name the field: {error:?}",
                    case.name
                ));
            }
        }
        // The job topic of the (possibly assigned) id carries the same answer, once.
        let on_job_topic = messages
            .iter()
            .filter(|m| m.topic == topics.job_result(&result.id))
            .count();
        if on_job_topic != 1 {
            failures.push(format!(
                "{}: {on_job_topic} results on the job topic of {}",
                case.name, result.id
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Exactly one result per request: the cases, the two valid requests, nothing else
    // (in particular nothing for the retained messages or the undeliverable one).
    let results: BTreeMap<String, usize> = messages
        .iter()
        .filter(|m| {
            m.topic.starts_with(&format!("edgegen/{node}/job/")) && m.topic.ends_with("/result")
        })
        .fold(BTreeMap::new(), |mut counts, m| {
            *counts.entry(m.topic.clone()).or_default() += 1;
            counts
        });
    assert_eq!(
        results.values().sum::<usize>(),
        cases.len() + 2,
        "{results:?}"
    );
    assert!(results.values().all(|&n| n == 1), "{results:?}");
    assert!(!results.contains_key(&topics.job_result("retained-1")));
    assert!(
        messages.iter().all(|m| !m.topic.starts_with("home/")),
        "the daemon published outside the reply filter"
    );
    assert!(
        messages
            .iter()
            .all(|m| m.topic != reply_topic("over-packet-limit")),
        "an undeliverable request was answered?"
    );
    // Only the two valid requests were queued.
    let queued: Vec<_> = messages
        .iter()
        .filter(|m| m.topic.ends_with("/status") && m.text().contains("\"queued\""))
        .map(|m| m.topic.clone())
        .collect();
    assert_eq!(
        queued,
        [topics.job_status("warm-up"), topics.job_status("after")]
    );

    // Nothing written for a rejected request, nothing left in the spool.
    let mut files_after = files_under(&daemon.output_dir());
    files_after.retain(|f| !files_before.contains(f));
    let names: Vec<String> = files_after
        .iter()
        .filter_map(|f| f.file_name()?.to_str().map(str::to_string))
        .collect();
    assert_eq!(names.len(), 2, "{files_after:?}");
    assert!(
        names.iter().all(|n| n.starts_with("after.")),
        "{files_after:?}"
    );
    wait_spool_empty(&daemon);
    assert!(
        rss_after <= rss_before + RSS_GROWTH_KIB,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    eprintln!(
        "{} hostile requests: all answered once; RSS {rss_before} KiB before, {rss_after} KiB after",
        cases.len()
    );

    // The daemon is still healthy and says so.
    assert!(
        daemon.wait_exit(Duration::from_millis(10)).is_none(),
        "daemon exited"
    );
    let _ = WAIT;
}
