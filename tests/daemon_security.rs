//! Access control: a Mosquitto with a password file and an ACL, where the
//! daemon may write under `edgegen/` and a client (`alice`) may only publish
//! requests and read job topics and her own reply topics.
//!
//! - A client cannot use the daemon as a confused deputy: `reply_to` and the
//!   MQTT 5 response topic must match `mqtt.reply_filter` (default
//!   `<prefix>/reply/#`), otherwise the request is refused naming the field,
//!   and nothing is published where she may not write herself.
//! - `edgegen request` works for her with a password file (never a password
//!   on the command line) under that ACL.
//! - When the broker refuses one of the daemon's publishes (PUBACK "not
//!   authorized"), the daemon does not retry it forever and loses no other result.
//! - The embedded broker listens on loopback only and, with a username and
//!   password file, lets no one in without them.

mod mqtt_support;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgegen::mqtt::messages::{ErrorCode, JobResult, JobState};
use edgegen::mqtt::topics::Topics;
use mqtt_support::{
    assert_stored, edgegen_request, free_port, wait_for_port, wait_spool_empty, Daemon,
    DaemonConfig, Mosquitto, Probe, WAIT,
};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Event, MqttOptions};

const ACL: &str = "\
user edgegen
topic readwrite edgegen/#
topic deny edgegen/reply/forbidden/#

user alice
topic write edgegen/+/request
topic read edgegen/+/job/#
topic read edgegen/+/availability
topic read edgegen/reply/alice/#

user admin
topic readwrite #
";

/// A broker whose second listener requires a login and applies `ACL`.
struct Secured {
    _broker: Mosquitto,
    port: u16,
    dir: std::path::PathBuf,
}

/// The broker's administrator, subscribed to every topic once the daemon is online.
fn admin_watching_everything(secured: &Secured, topics: &Topics) -> Probe {
    let admin = Probe::connect_as(
        secured.port,
        "admin-probe",
        false,
        Some(("admin", "admin-pw")),
    );
    admin.subscribe("#");
    admin.wait_payload(&topics.availability(), "online", 1);
    admin
}

fn secured_broker(dir: &Path) -> Secured {
    fs::create_dir_all(dir).expect("dir");
    let users = dir.join("passwords");
    for (n, (user, password)) in [
        ("edgegen", "daemon-pw"),
        ("alice", "alice-pw"),
        ("admin", "admin-pw"),
    ]
    .iter()
    .enumerate()
    {
        let mut command = Command::new("mosquitto_passwd");
        command.arg("-b");
        if n == 0 {
            command.arg("-c");
        }
        let status = command
            .arg(&users)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd");
        assert!(status.success());
    }
    let acl = dir.join("acl");
    fs::write(&acl, ACL).expect("acl");
    let port = free_port();
    let extra = format!(
        "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
        users.display(),
        acl.display()
    );
    let broker = Mosquitto::start_with(&dir.join("broker"), &extra);
    wait_for_port(port, Duration::from_secs(10));
    Secured {
        _broker: broker,
        port,
        dir: dir.to_path_buf(),
    }
}

fn password_file(dir: &Path, name: &str, password: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.password"));
    fs::write(&path, format!("{password}\n")).expect("password file");
    path
}

fn daemon_on(secured: &Secured, node: &str) -> Daemon {
    let mut config = DaemonConfig::new(&format!("mqtt://127.0.0.1:{}", secured.port), node);
    config.mqtt_extra = format!(
        "username = \"edgegen\"\npassword_file = \"{}\"",
        password_file(&secured.dir, "edgegen", "daemon-pw").display()
    );
    Daemon::start(&secured.dir.join(format!("daemon-{node}")), config)
}

#[test]
fn a_client_cannot_make_the_daemon_publish_where_it_may_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secured = secured_broker(dir.path());
    let daemon = daemon_on(&secured, "acl");
    let topics = daemon.topics();
    let node = &daemon.config.node;
    let admin = admin_watching_everything(&secured, &topics);
    let alice = Probe::connect_as(
        secured.port,
        "alice-probe",
        false,
        Some(("alice", "alice-pw")),
    );
    alice.subscribe(&format!("edgegen/{node}/job/#"));
    alice.subscribe("edgegen/reply/alice/#");

    // The precondition of a confused deputy: alice may not write these herself.
    // (Her own client for it: the broker's refusal makes rumqttc reconnect.)
    {
        let direct = Probe::connect_as(
            secured.port,
            "alice-direct",
            false,
            Some(("alice", "alice-pw")),
        );
        direct.publish("secret/alarm", "from alice");
        direct.publish("edgegen/other-node/availability", "offline");
        std::thread::sleep(Duration::from_millis(300));
    }

    let asks = [
        (
            "deputy-secret",
            r#"{"id":"deputy-secret","prompt":"x","reply_to":"secret/alarm"}"#,
            None,
        ),
        (
            "deputy-node",
            r#"{"id":"deputy-node","prompt":"x","reply_to":"edgegen/other-node/request"}"#,
            None,
        ),
        (
            "deputy-retained",
            r#"{"id":"deputy-retained","prompt":"x","reply_to":"edgegen/other-node/availability"}"#,
            None,
        ),
        (
            "deputy-response",
            r#"{"id":"deputy-response","prompt":"x"}"#,
            Some("secret/response"),
        ),
    ];
    for (_, payload, response) in &asks {
        match response {
            Some(topic) => alice.publish_with_response(&topics.request(), *payload, topic, b"c"),
            None => alice.publish(&topics.request(), *payload),
        }
    }
    // Her own reply topic is fine.
    alice.publish(
        &topics.request(),
        r#"{"id":"alice-ok","prompt":"a plum","seed":7,"reply_to":"edgegen/reply/alice/1"}"#,
    );
    let ids: Vec<&str> = asks
        .iter()
        .map(|(id, ..)| *id)
        .chain(["alice-ok"])
        .collect();
    let results = alice.results(&topics, &ids);
    for (id, _, response) in &asks {
        let result = &results[*id];
        assert_eq!(result.state, Some(JobState::Failed), "{id}: {result:?}");
        let error = result.error.as_ref().expect("error");
        let field = if response.is_some() {
            "response_topic"
        } else {
            "reply_to"
        };
        assert_eq!(
            (error.code, error.field.as_deref()),
            (ErrorCode::InvalidRequest, Some(field)),
            "{id}: {error:?}"
        );
        assert!(error.message.contains("mqtt.reply_filter"), "{error:?}");
    }
    assert_stored(&results["alice-ok"]);
    let reply = alice.wait("alice's reply", WAIT, |msgs| {
        msgs.iter().any(|m| m.topic == "edgegen/reply/alice/1")
    });
    let reply: JobResult = reply
        .iter()
        .find(|m| m.topic == "edgegen/reply/alice/1")
        .expect("reply")
        .json();
    assert_eq!(reply, results["alice-ok"]);

    // The administrator, who sees everything, saw nothing outside the daemon's
    // own topics and the reply space: not alice's direct attempts, not the deputy ones.
    let allowed = |topic: &str| {
        topic.starts_with(&format!("edgegen/{node}/")) || topic.starts_with("edgegen/reply/")
    };
    let outside: BTreeSet<String> = admin
        .messages()
        .into_iter()
        .map(|m| m.topic)
        .filter(|t| !allowed(t))
        .collect();
    assert!(outside.is_empty(), "published outside: {outside:?}");

    // `edgegen request` as alice: credentials from the config's password file.
    let config = dir.path().join("alice.toml");
    fs::write(
        &config,
        format!(
            "[mqtt]\nbroker = \"mqtt://127.0.0.1:{}\"\nusername = \"alice\"\npassword_file = \"{}\"\n",
            secured.port,
            password_file(dir.path(), "alice", "alice-pw").display()
        ),
    )
    .expect("alice config");
    let saved = dir.path().join("alice.png");
    let config = config.to_string_lossy();
    let args = [
        "--config",
        &config,
        "--node",
        node,
        "--prompt",
        "a fig",
        "--seed",
        "8",
        "--id",
        "alice-cli",
    ];
    edgegen_request(&args, &saved, "warn");
    assert!(saved.is_file());
    drop(daemon);
}

#[test]
fn a_refused_publish_is_not_retried_forever_and_loses_no_other_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secured = secured_broker(dir.path());
    let daemon = daemon_on(&secured, "denied");
    let topics = daemon.topics();
    let admin = admin_watching_everything(&secured, &topics);

    // The reply filter allows this topic, the broker's ACL does not: the
    // broker answers the daemon's publish with PUBACK 0x87 (not authorized).
    admin.publish(
        &topics.request(),
        r#"{"id":"refused","prompt":"x","seed":1,"reply_to":"edgegen/reply/forbidden/1"}"#,
    );
    // More requests right behind it, some answered while the daemon reconnects.
    let ids: Vec<String> = (0..10).map(|n| format!("after-{n}")).collect();
    for id in &ids {
        admin.publish(
            &topics.request(),
            format!(r#"{{"id":"{id}","prompt":"y","seed":2}}"#),
        );
    }
    let mut all: Vec<&str> = ids.iter().map(String::as_str).collect();
    all.push("refused");
    let results = admin.results(&topics, &all);
    for id in &all {
        assert_stored(&results[*id]);
    }
    wait_spool_empty(&daemon);
    // The refusal cost one reconnection; afterwards the connection stays up.
    std::thread::sleep(Duration::from_secs(3));
    let log = daemon.log();
    let refusals = log.matches("NotAuthorized").count();
    let reconnections = log.matches("retrying in").count();
    assert!(refusals >= 1, "the refusal is logged:\n{log}");
    assert!(reconnections <= 2, "{reconnections} reconnections:\n{log}");
    let settled = daemon.log().matches("retrying in").count();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        daemon.log().matches("retrying in").count(),
        settled,
        "still retrying:\n{log}"
    );
    assert!(
        admin
            .messages()
            .iter()
            .all(|m| !m.topic.starts_with("edgegen/reply/forbidden")),
        "the refused message was delivered after all?"
    );
    // At-least-once: a result in flight when the connection dropped may come twice, never zero times.
    let mut doubled = 0;
    for id in &all {
        let copies = admin.on_topic(&topics.job_result(id)).len();
        assert!((1..=2).contains(&copies), "{id}: {copies} results");
        doubled += usize::from(copies == 2);
    }
    eprintln!(
        "refused publish: {refusals} refusal(s) logged, {reconnections} reconnection(s), \
         {} of {} results delivered, {doubled} twice",
        all.len(),
        all.len()
    );
}

/// True when a client with these credentials gets a successful CONNACK.
fn can_connect(port: u16, credentials: Option<(&str, &str)>) -> bool {
    let mut options = MqttOptions::new(format!("check-{}", free_port()), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, mut connection) = Client::new(options, 10);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut connected = false;
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = ack.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let _ = client.disconnect();
    connected
}

/// Local addresses of the TCP sockets the process listens on.
fn listening_addresses(pid: u32) -> Vec<String> {
    let inodes: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let mut addresses = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                addresses.push(cols[1].to_string());
            }
        }
    }
    addresses
}

#[test]
fn embedded_broker_listens_on_loopback_and_requires_its_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut config = DaemonConfig::new("embedded", "locked");
    config.listen = format!("127.0.0.1:{port}");
    config.mqtt_extra = format!(
        "username = \"kiosk\"\npassword_file = \"{}\"",
        password_file(dir.path(), "kiosk", "kiosk-pw").display()
    );
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    wait_for_port(port, Duration::from_secs(60));
    let topics = daemon.topics();

    let probe = Probe::connect_as(port, "kiosk-probe", false, Some(("kiosk", "kiosk-pw")));
    probe.subscribe(&format!("edgegen/{}/#", daemon.config.node));
    probe.wait_payload(&topics.availability(), "online", 1);
    probe.publish(
        &topics.request(),
        r#"{"id":"locked-1","prompt":"a key","seed":9}"#,
    );
    assert_stored(&probe.results(&topics, &["locked-1"])["locked-1"]);

    assert!(!can_connect(port, None), "anonymous client let in");
    assert!(
        !can_connect(port, Some(("kiosk", "wrong"))),
        "wrong password let in"
    );
    assert!(
        !can_connect(port, Some(("someone", "kiosk-pw"))),
        "wrong user let in"
    );
    assert!(can_connect(port, Some(("kiosk", "kiosk-pw"))));

    // Every listening socket of the daemon (front and rumqttd's own) is on 127.0.0.1.
    let addresses = listening_addresses(daemon.pid());
    assert!(addresses.len() >= 3, "{addresses:?}");
    assert!(
        addresses.iter().all(|a| a.starts_with("0100007F:")),
        "not loopback: {addresses:?}"
    );
}
