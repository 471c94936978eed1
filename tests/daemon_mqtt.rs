//! `edgegen serve` against a real Mosquitto, driven over MQTT only: the happy
//! path with files on disk, bare prompts, returned pictures, `reply_to`, MQTT 5
//! response topics, cancel, idempotent ids, `busy`, and a named error for every
//! invalid field with nothing written for rejected requests.
//!
//! Each test starts its own broker and daemon (the tiny random-weight model
//! generates 64x64 pictures in a fraction of a second). Files are compared
//! exactly (sha256), so there is no tolerance anywhere.

mod mqtt_support;

use std::path::PathBuf;

use edgegen::mqtt::messages::{ErrorCode, JobResult, JobState, ModelsMessage, StatsMessage};
use mqtt_support::{
    assert_stored, files_under, pngs, setup, sha256_hex, wait_spool_empty, Daemon, DaemonConfig,
    Mosquitto, Probe, WAIT,
};

#[test]
fn request_gives_status_result_and_stored_files() {
    let s = setup("happy", |_| {});
    s.probe.publish(
        &s.topics.request(),
        r#"{"id":"apple-1","prompt":"a red apple on a tree","seed":42}"#,
    );
    let result = &s.probe.results(&s.topics, &["apple-1"])["apple-1"];
    assert_stored(result);
    assert_eq!(result.model.as_deref(), Some("tiny-random-sd"));
    assert_eq!(
        (result.seed, result.steps, result.width, result.height),
        (Some(42), Some(4), Some(64), Some(64))
    );
    let timings = result.timings.as_ref().expect("timings");
    assert!(
        timings.unet_ms.is_some()
            && timings.vae_decoder_ms.is_some()
            && timings.text_encoder_ms.is_some()
    );
    let path = PathBuf::from(result.path.as_deref().expect("path"));
    let date = chrono::Local::now().format("%Y-%m-%d").to_string();
    assert_eq!(path, s.daemon.output_dir().join(&date).join("apple-1.png"));

    // queued → running (step 0) → … → done (step 4), in that order.
    let states = s.probe.states(&s.topics, "apple-1");
    assert_eq!(
        states.first().map(|st| st.state),
        Some(JobState::Queued),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(|st| (st.state, st.step, st.steps)),
        Some((JobState::Done, 4, 4)),
        "{states:?}"
    );
    let running: Vec<u32> = states
        .iter()
        .filter(|st| st.state == JobState::Running)
        .map(|st| st.step)
        .collect();
    assert_eq!(running.first(), Some(&0), "{states:?}");
    assert!(
        running.windows(2).all(|w| w[0] < w[1]),
        "steps go up: {running:?}"
    );

    let models: ModelsMessage = s
        .probe
        .on_topic(&s.topics.models())
        .last()
        .expect("models message")
        .json();
    let model = models
        .models
        .iter()
        .find(|m| m.id == "tiny-random-sd")
        .expect("bundled model listed");
    assert!(model.default && model.kind == "diffusion", "{model:?}");
    let stats_topic = s.topics.stats();
    s.probe.wait("stats with one job done", WAIT, |msgs| {
        msgs.iter()
            .filter(|m| m.topic == stats_topic)
            .any(|m| m.json::<StatsMessage>().done == 1)
    });
    wait_spool_empty(&s.daemon);
}

#[test]
fn bare_prompt_is_a_request() {
    let s = setup("bare", |_| {});
    s.probe
        .publish(&s.topics.request(), "a red apple on a tree");
    let prefix = format!("edgegen/{}/job/", s.daemon.config.node);
    let messages = s.probe.wait("a result", WAIT, |msgs| {
        msgs.iter()
            .any(|m| m.topic.starts_with(&prefix) && m.topic.ends_with("/result"))
    });
    let result: JobResult = messages
        .iter()
        .find(|m| m.topic.ends_with("/result"))
        .expect("result")
        .json();
    assert_stored(&result);
    let sidecar: serde_json::Value = serde_json::from_slice(
        &std::fs::read(result.sidecar.as_deref().expect("sidecar")).expect("read"),
    )
    .expect("json");
    assert_eq!(sidecar["request"]["prompt"], "a red apple on a tree");
    assert_eq!(
        sidecar["request"]["id"],
        result.id.as_str(),
        "the assigned id is recorded"
    );
}

#[test]
fn return_image_sends_the_stored_png() {
    let s = setup("image", |_| {});
    s.probe.publish(
        &s.topics.request(),
        r#"{"id":"img-1","prompt":"a pear","return_image":true}"#,
    );
    let result = &s.probe.results(&s.topics, &["img-1"])["img-1"];
    assert_stored(result);
    let images = s.probe.on_topic(&s.topics.job_image("img-1", 0));
    assert_eq!(images.len(), 1, "one picture message");
    assert!(images[0].payload.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert_eq!(
        Some(sha256_hex(&images[0].payload)),
        result.sha256,
        "the bytes sent are the bytes stored"
    );
}

#[test]
fn reply_to_and_mqtt5_response_topic_get_the_result() {
    let s = setup("reply", |_| {});
    s.probe.subscribe("edgegen/reply/test/#");
    s.probe.publish(
        &s.topics.request(),
        r#"{"id":"rt-1","prompt":"a plum","reply_to":"edgegen/reply/test/rt"}"#,
    );
    s.probe.publish_with_response(
        &s.topics.request(),
        r#"{"id":"corr-1","prompt":"a fig"}"#,
        "edgegen/reply/test/corr",
        b"\x00correlation\xff",
    );
    let results = s.probe.results(&s.topics, &["rt-1", "corr-1"]);
    let replies = s.probe.wait("both replies", WAIT, |msgs| {
        ["edgegen/reply/test/rt", "edgegen/reply/test/corr"]
            .iter()
            .all(|t| msgs.iter().any(|m| m.topic == *t))
    });
    let reply: JobResult = replies
        .iter()
        .find(|m| m.topic == "edgegen/reply/test/rt")
        .expect("reply_to")
        .json();
    assert_eq!(reply, results["rt-1"]);
    assert_stored(&reply);
    let response = replies
        .iter()
        .find(|m| m.topic == "edgegen/reply/test/corr")
        .expect("response topic");
    assert_eq!(
        response.correlation.as_deref(),
        Some(&b"\x00correlation\xff"[..]),
        "correlation data echoed"
    );
    assert_eq!(response.json::<JobResult>(), results["corr-1"]);
    assert_stored(&results["corr-1"]);
}

#[test]
fn cancel_works_for_queued_and_running_jobs() {
    let s = setup("cancel", |_| {});
    // 50 steps at 128x128: long enough to cancel mid-way.
    let long = r#"{"id":"long-1","prompt":"a long one","steps":50,"width":128,"height":128}"#;
    let queued = r#"{"id":"queued-1","prompt":"waits","steps":50,"width":128,"height":128}"#;
    s.probe.publish(&s.topics.request(), long);
    s.probe.publish(&s.topics.request(), queued);
    let status_topic = s.topics.job_status("long-1");
    s.probe.wait("long-1 past its first step", WAIT, |msgs| {
        msgs.iter().filter(|m| m.topic == status_topic).any(|m| {
            let st: edgegen::mqtt::messages::Status = m.json();
            st.state == JobState::Running && st.step >= 1
        })
    });
    s.probe.publish(&s.topics.cancel(), r#"{"id":"queued-1"}"#);
    s.probe.publish(&s.topics.cancel(), r#"{"id":"long-1"}"#);
    let results = s.probe.results(&s.topics, &["long-1", "queued-1"]);
    for (id, result) in &results {
        assert_eq!(result.state, Some(JobState::Cancelled), "{id}: {result:?}");
        assert_eq!(
            result.error.as_ref().map(|e| e.code),
            Some(ErrorCode::Cancelled),
            "{id}"
        );
    }
    let last_step = s
        .probe
        .states(&s.topics, "long-1")
        .iter()
        .filter(|st| st.state == JobState::Running)
        .map(|st| st.step)
        .max();
    assert!(
        last_step.is_some_and(|step| step < 50),
        "stopped before the end: {last_step:?}"
    );
    assert!(
        s.probe
            .states(&s.topics, "queued-1")
            .iter()
            .all(|st| st.state != JobState::Running),
        "queued-1 never ran"
    );
    assert!(
        pngs(&s.daemon).is_empty(),
        "cancelled jobs leave no pictures: {:?}",
        pngs(&s.daemon)
    );
    wait_spool_empty(&s.daemon);
}

#[test]
fn duplicate_ids_are_not_generated_twice() {
    let s = setup("dup", |_| {});
    // A finished id is answered from storage.
    s.probe
        .publish(&s.topics.request(), r#"{"id":"dup-1","prompt":"a lemon"}"#);
    let first = s.probe.results(&s.topics, &["dup-1"])["dup-1"].clone();
    s.probe
        .publish(&s.topics.request(), r#"{"id":"dup-1","prompt":"a lemon"}"#);
    let topic = s.topics.job_result("dup-1");
    let msgs = s.probe.wait("a second answer for dup-1", WAIT, |m| {
        m.iter().filter(|m| m.topic == topic).count() == 2
    });
    let second: JobResult = msgs
        .iter()
        .filter(|m| m.topic == topic)
        .nth(1)
        .expect("second")
        .json();
    assert!(second.from_storage && !first.from_storage);
    assert_eq!(
        (second.sha256.as_ref(), second.path.as_ref()),
        (first.sha256.as_ref(), first.path.as_ref())
    );

    // A duplicate of a queued job is not queued twice: one run, one result.
    // The duplicate names its own reply topic: the one run answers it there too.
    s.probe.subscribe("edgegen/reply/dup/#");
    let long = r#"{"id":"dup-2","prompt":"a melon","steps":30}"#;
    let again = r#"{"id":"dup-2","prompt":"a melon","steps":30,"reply_to":"edgegen/reply/dup/2"}"#;
    s.probe.publish(&s.topics.request(), long);
    s.probe.publish(&s.topics.request(), again);
    let dup2 = s.probe.results(&s.topics, &["dup-2"])["dup-2"].clone();
    // A marker job queued after both: once it is done, a second dup-2 run would have shown.
    s.probe
        .publish(&s.topics.request(), r#"{"id":"marker","prompt":"x"}"#);
    s.probe.results(&s.topics, &["marker"]);
    assert_eq!(
        s.probe.on_topic(&s.topics.job_result("dup-2")).len(),
        1,
        "one result for dup-2"
    );
    let replies = s.probe.on_topic("edgegen/reply/dup/2");
    assert_eq!(replies.len(), 1, "the duplicate's reply_to got the result");
    assert_eq!(replies[0].json::<JobResult>(), dup2);
    let names: Vec<String> = pngs(&s.daemon)
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("dup-")).count(),
        2,
        "{names:?}"
    );
}

#[test]
fn full_queue_answers_busy() {
    let s = setup("busy", |c| c.queue = 2);
    for i in 1..=4 {
        let payload =
            format!(r#"{{"id":"b{i}","prompt":"p","steps":50,"width":128,"height":128}}"#);
        s.probe.publish(&s.topics.request(), payload);
    }
    let results = s.probe.results(&s.topics, &["b1", "b2", "b3", "b4"]);
    for id in ["b1", "b2"] {
        assert_stored(&results[id]);
    }
    for id in ["b3", "b4"] {
        let error = results[id]
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{id}: {:?}", results[id]));
        assert_eq!(error.code, ErrorCode::Busy, "{id}: {error:?}");
        assert!(
            s.probe.states(&s.topics, id).is_empty(),
            "{id} was never queued"
        );
    }
}

#[test]
fn every_invalid_field_is_named_and_nothing_is_written() {
    let s = setup("invalid", |c| c.max_payload_bytes = 4096);
    s.probe.subscribe("edgegen/reply/invalid/#");
    let long_prompt = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(201));
    let too_large = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(5000));
    let long_id = format!(r#"{{"id":"{}","prompt":"x"}}"#, "i".repeat(65));
    let invalid = ErrorCode::InvalidRequest;
    // (case, payload, code, field named in the error)
    let cases: Vec<(&str, &str, ErrorCode, Option<&str>)> = vec![
        (
            "steps-zero",
            r#"{"prompt":"x","steps":0}"#,
            invalid,
            Some("steps"),
        ),
        (
            "steps-over-limit",
            r#"{"prompt":"x","steps":51}"#,
            invalid,
            Some("steps"),
        ),
        (
            "steps-string",
            r#"{"prompt":"x","steps":"four"}"#,
            invalid,
            Some("steps"),
        ),
        (
            "steps-fraction",
            r#"{"prompt":"x","steps":2.5}"#,
            invalid,
            Some("steps"),
        ),
        (
            "width-not-multiple",
            r#"{"prompt":"x","width":65}"#,
            invalid,
            Some("width"),
        ),
        (
            "height-type",
            r#"{"prompt":"x","height":true}"#,
            invalid,
            Some("height"),
        ),
        (
            "too-many-pixels",
            r#"{"prompt":"x","width":1024,"height":1024}"#,
            invalid,
            Some("width"),
        ),
        (
            "guidance-range",
            r#"{"prompt":"x","guidance":100}"#,
            invalid,
            Some("guidance"),
        ),
        (
            "guidance-type",
            r#"{"prompt":"x","guidance":"high"}"#,
            invalid,
            Some("guidance"),
        ),
        (
            "scheduler-unknown",
            r#"{"prompt":"x","scheduler":"nope"}"#,
            invalid,
            Some("scheduler"),
        ),
        ("prompt-too-long", &long_prompt, invalid, Some("prompt")),
        ("prompt-type", r#"{"prompt":5}"#, invalid, Some("prompt")),
        (
            "negative-type",
            r#"{"prompt":"x","negative_prompt":[1]}"#,
            invalid,
            Some("negative_prompt"),
        ),
        (
            "seed-negative",
            r#"{"prompt":"x","seed":-1}"#,
            invalid,
            Some("seed"),
        ),
        (
            "class-on-diffusion",
            r#"{"prompt":"x","class":"apple"}"#,
            invalid,
            Some("class"),
        ),
        (
            "batch-zero",
            r#"{"prompt":"x","batch":0}"#,
            invalid,
            Some("batch"),
        ),
        (
            "return-image-type",
            r#"{"prompt":"x","return_image":"yes"}"#,
            invalid,
            Some("return_image"),
        ),
        (
            "id-path",
            r#"{"id":"../../etc/passwd","prompt":"x"}"#,
            invalid,
            Some("id"),
        ),
        ("id-too-long", &long_id, invalid, Some("id")),
        (
            "reply-to-wildcard",
            r#"{"prompt":"x","reply_to":"a/#"}"#,
            invalid,
            Some("reply_to"),
        ),
        (
            "unknown-field",
            r#"{"prompt":"x","colour":"red"}"#,
            invalid,
            Some("colour"),
        ),
        (
            "model-path",
            r#"{"prompt":"x","model":"../models/tiny-random-sd"}"#,
            invalid,
            Some("model"),
        ),
        (
            "model-unknown",
            r#"{"prompt":"x","model":"no-such-model"}"#,
            ErrorCode::UnknownModel,
            Some("model"),
        ),
        ("not-an-object", r#"["x"]"#, invalid, Some("payload")),
        ("broken-json", r#"{"prompt": "#, invalid, Some("payload")),
        ("empty", "", invalid, Some("prompt")),
        ("too-large", &too_large, ErrorCode::TooLarge, None),
    ];
    for (case, payload, _, _) in &cases {
        s.probe.publish_with_response(
            &s.topics.request(),
            *payload,
            &format!("edgegen/reply/invalid/{case}"),
            case.as_bytes(),
        );
    }
    let topics: Vec<String> = cases
        .iter()
        .map(|(case, ..)| format!("edgegen/reply/invalid/{case}"))
        .collect();
    let messages = s
        .probe
        .wait("an answer to every invalid request", WAIT, |msgs| {
            topics.iter().all(|t| msgs.iter().any(|m| &m.topic == t))
        });
    for (case, _, code, field) in &cases {
        let topic = format!("edgegen/reply/invalid/{case}");
        let answers: Vec<_> = messages.iter().filter(|m| m.topic == topic).collect();
        assert_eq!(answers.len(), 1, "{case}: exactly one answer");
        assert_eq!(
            answers[0].correlation.as_deref(),
            Some(case.as_bytes()),
            "{case}: correlation"
        );
        let result: JobResult = answers[0].json();
        assert_eq!(result.state, Some(JobState::Failed), "{case}");
        let error = result
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{case}: no error"));
        assert_eq!(error.code, *code, "{case}: {error:?}");
        assert_eq!(error.field.as_deref(), *field, "{case}: {error:?}");
        if let Some(field) = field {
            assert!(
                error.message.contains(field),
                "{case}: message names the field: {error:?}"
            );
        }
        // The job topic carries the same answer.
        let on_job_topic = s.probe.on_topic(&s.topics.job_result(&result.id));
        assert_eq!(on_job_topic.len(), 1, "{case}: result on the job topic");
    }
    let statuses = s
        .probe
        .messages()
        .into_iter()
        .filter(|m| m.topic.ends_with("/status"))
        .count();
    assert_eq!(statuses, 0, "no rejected request was queued");
    assert!(
        files_under(&s.daemon.output_dir()).is_empty(),
        "nothing stored: {:?}",
        files_under(&s.daemon.output_dir())
    );
    assert!(
        s.daemon.spool_files().is_empty(),
        "nothing spooled: {:?}",
        s.daemon.spool_files()
    );
}

#[test]
fn retention_keeps_storage_under_max_bytes() {
    // A 64x64 noise PNG with its sidecar is about 14 kB: 40 kB holds two results.
    let max_bytes = 40_000;
    let s = setup("retention", |c| c.max_bytes = max_bytes);
    let ids: Vec<String> = (0..6).map(|i| format!("keep{i}")).collect();
    for id in &ids {
        s.probe.publish(
            &s.topics.request(),
            format!(r#"{{"id":"{id}","prompt":"p"}}"#),
        );
        s.probe.results(&s.topics, &[id.as_str()]);
    }
    let files = files_under(&s.daemon.output_dir());
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(s.daemon.output_dir().join(f)).map_or(0, |m| m.len()))
        .sum();
    assert!(total <= max_bytes, "{total} bytes stored: {files:?}");
    let kept: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| {
            pngs(&s.daemon)
                .iter()
                .any(|p| p.ends_with(format!("{id}.png")))
        })
        .collect();
    assert!(kept.contains(&"keep5"), "the newest stays: {kept:?}");
    assert!(!kept.contains(&"keep0"), "the oldest goes first: {kept:?}");
    assert!(
        files
            .iter()
            .all(|f| f.extension().is_some_and(|e| e == "png" || e == "json")),
        "pairs only: {files:?}"
    );
}

#[test]
fn fleet_requests_arrive_through_the_shared_subscription() {
    let s = setup("fleet", |c| c.shared_group = "edgegen".into());
    s.probe
        .publish("edgegen/request", r#"{"id":"fleet-1","prompt":"p"}"#);
    assert_stored(&s.probe.results(&s.topics, &["fleet-1"])["fleet-1"]);
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl tool.
fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2"],
        &[
            "-subj",
            "/CN=edgegen test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
        &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

#[test]
fn external_broker_over_tls_with_username_and_password_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    make_certificates(&tls);
    let users = tls.join("passwords");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&users)
        .args(["edgegen", "s3cret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success());
    let tls_port = mqtt_support::free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\nallow_anonymous false\npassword_file {users}\n\
         cafile {t}/ca.crt\ncertfile {t}/server.crt\nkeyfile {t}/server.key\n",
        users = users.display(),
        t = tls.display()
    );
    let broker = Mosquitto::start_with(&dir.path().join("broker"), &extra);
    mqtt_support::wait_for_port(tls_port, std::time::Duration::from_secs(10));
    let password_file = tls.join("edgegen.password");
    std::fs::write(&password_file, "s3cret\n").expect("password file");

    let mut config = DaemonConfig::new(&format!("mqtts://127.0.0.1:{tls_port}"), "tls");
    config.mqtt_extra = format!(
        "username = \"edgegen\"\npassword_file = \"{}\"\nca_file = \"{}\"",
        password_file.display(),
        tls.join("ca.crt").display()
    );
    // The probe uses the plain anonymous listener of the same broker.
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    probe.subscribe(&format!("edgegen/{}/#", config.node));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);
    probe.publish(&topics.request(), r#"{"id":"tls-1","prompt":"p"}"#);
    assert_stored(&probe.results(&topics, &["tls-1"])["tls-1"]);
}
