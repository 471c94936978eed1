//! Helpers for the daemon tests: a real Mosquitto on a free loopback port,
//! the `edgegen serve` binary with a generated configuration, and an MQTT 5
//! probe client that records every message it sees.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use edgegen::mqtt::messages::{JobResult, JobState, Status};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use rumqttc::Outgoing;
use sha2::{Digest, Sha256};

/// Generous: two cores are shared by every test and every engineer's build.
pub const WAIT: Duration = Duration::from_secs(90);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {} failed", child.id());
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A Mosquitto, one daemon on it, and a probe subscribed to all of the daemon's
/// topics, the daemon online. Declared so that processes stop before their
/// directory goes.
pub struct Setup {
    pub probe: Probe,
    pub daemon: Daemon,
    pub broker: Mosquitto,
    pub topics: edgegen::mqtt::topics::Topics,
    pub dir: tempfile::TempDir,
}

pub fn setup(name: &str, edit: impl FnOnce(&mut DaemonConfig)) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let mut config = DaemonConfig::new(&broker.url(), name);
    edit(&mut config);
    let probe = Probe::connect(broker.port, &format!("probe-{}", config.node), false);
    probe.subscribe(&format!("edgegen/{}/#", config.node));
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();
    probe.wait_payload(&topics.availability(), "online", 1);
    Setup {
        probe,
        daemon,
        broker,
        topics,
        dir,
    }
}

/// Runs `edgegen request ARGS --timeout 120 --output OUTPUT` with `EDGEGEN_LOG=log`,
/// asserts that it succeeded and returns what it printed.
pub fn edgegen_request(args: &[&str], output: &Path, log: &str) -> std::process::Output {
    let done = Command::new(daemon_binary())
        .arg("request")
        .args(args)
        .args(["--timeout", "120", "--output"])
        .arg(output)
        .env("EDGEGEN_LOG", log)
        .output()
        .expect("edgegen request");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    done
}

/// The pictures a daemon stored, relative to its output directory.
pub fn pngs(daemon: &Daemon) -> Vec<PathBuf> {
    files_under(&daemon.output_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect()
}

/// Every file under `dir` (recursively), relative paths sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    found.sort();
    found
}

// ---------------------------------------------------------------- Mosquitto

/// A Mosquitto process of our own (never the system service), with persistence
/// in its directory so sessions survive a restart.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    /// More configuration (listeners) after the anonymous loopback listener.
    extra: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        Mosquitto::start_with(dir, "")
    }

    /// `extra` is appended to the configuration (with per-listener settings on).
    pub fn start_with(dir: &Path, extra: &str) -> Mosquitto {
        Mosquitto::start_on(dir, free_port(), extra)
    }

    /// On a given port (e.g. one a daemon is already trying to reach).
    pub fn start_on(dir: &Path, port: u16, extra: &str) -> Mosquitto {
        fs::create_dir_all(dir).expect("mosquitto dir");
        let mut broker = Mosquitto {
            port,
            dir: dir.to_path_buf(),
            extra: extra.to_string(),
            child: None,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        let text = format!(
            "per_listener_settings true\n\
             persistence true\n\
             persistence_location {dir}/\n\
             max_queued_messages 10000\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\n\
             user root\n\
             set_tcp_nodelay true\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             {extra}\n",
            port = self.port,
            dir = self.dir.display(),
            extra = self.extra,
        );
        fs::write(&conf, text).expect("mosquitto.conf");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .expect("log");
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "start mosquitto (install it with: apt-get install -y mosquitto mosquitto-clients)",
            );
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (Mosquitto saves its persistence file) and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            wait_exit(&mut child, Duration::from_secs(10)).expect("mosquitto did not stop");
        }
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

/// `mosquitto` lives in /usr/sbin, which is not on every user's PATH.
fn mosquitto_binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.is_file() {
        sbin
    } else {
        PathBuf::from("mosquitto")
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------- daemon

/// The parts of a test daemon's configuration that tests vary.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub broker: String,
    pub listen: String,
    pub node: String,
    pub queue: usize,
    pub max_payload_bytes: usize,
    pub max_bytes: u64,
    pub threads: usize,
    pub shared_group: String,
    /// Lines for `[mqtt]` (credentials, CA file).
    pub mqtt_extra: String,
    /// `Some(host:port)`: also serve the kiosk page and HTTP API there.
    pub kiosk_listen: Option<String>,
    /// `models.dir`; the repository's `models/` unless set.
    pub models_dir: Option<PathBuf>,
    /// `models.default`.
    pub default_model: String,
    /// `storage.output_dir` and `storage.state_dir`; under the daemon's directory unless set.
    pub output_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

impl DaemonConfig {
    pub fn new(broker: &str, node: &str) -> DaemonConfig {
        DaemonConfig {
            broker: broker.to_string(),
            listen: "127.0.0.1:1883".into(),
            node: format!("{node}-{}", std::process::id()),
            queue: 16,
            max_payload_bytes: 65536,
            max_bytes: 0,
            threads: 1,
            shared_group: String::new(),
            mqtt_extra: String::new(),
            kiosk_listen: None,
            models_dir: None,
            default_model: "tiny-random-sd".into(),
            output_dir: None,
            state_dir: None,
        }
    }

    fn toml(&self, dir: &Path) -> String {
        format!(
            r#"[models]
dir = "{models}"
default = "{default_model}"

[engine]
threads = {threads}

[mqtt]
broker = "{broker}"
listen = "{listen}"
node_id = "{node}"
shared_group = "{shared_group}"
{mqtt_extra}

[limits]
queue = {queue}
max_payload_bytes = {max_payload}
max_prompt_chars = 200

[storage]
output_dir = "{output_dir}"
state_dir = "{state_dir}"
max_bytes = {max_bytes}
{kiosk}"#,
            models = self
                .models_dir
                .clone()
                .unwrap_or_else(|| repo().join("models"))
                .display(),
            default_model = self.default_model,
            output_dir = self
                .output_dir
                .clone()
                .unwrap_or_else(|| dir.join("images"))
                .display(),
            state_dir = self
                .state_dir
                .clone()
                .unwrap_or_else(|| dir.join("state"))
                .display(),
            broker = self.broker,
            listen = self.listen,
            node = self.node,
            queue = self.queue,
            max_payload = self.max_payload_bytes,
            max_bytes = self.max_bytes,
            threads = self.threads,
            shared_group = self.shared_group,
            mqtt_extra = self.mqtt_extra,
            kiosk = self.kiosk_section(),
        )
    }

    fn kiosk_section(&self) -> String {
        match &self.kiosk_listen {
            Some(listen) => format!("\n[kiosk]\nenabled = true\nlisten = \"{listen}\"\n"),
            None => String::new(),
        }
    }
}

/// The binary under test; `EDGEGEN_TEST_BIN` names another build (e.g. a
/// release binary for measurements).
fn daemon_binary() -> PathBuf {
    std::env::var_os("EDGEGEN_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgegen")))
}

/// `edgegen serve` as a child process, its log in `<dir>/daemon.log`.
pub struct Daemon {
    pub dir: PathBuf,
    pub config: DaemonConfig,
    pub config_path: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(dir: &Path, config: DaemonConfig) -> Daemon {
        fs::create_dir_all(dir).expect("daemon dir");
        let config_path = dir.join("edgegen.toml");
        fs::write(&config_path, config.toml(dir)).expect("write config");
        let mut daemon = Daemon {
            dir: dir.to_path_buf(),
            config,
            config_path,
            child: None,
        };
        daemon.launch();
        daemon
    }

    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("log");
        let mut command = Command::new(daemon_binary());
        // EDGEGEN_* variables are configuration overrides: only the generated file counts.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("EDGEGEN_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .current_dir(&self.dir)
            .env("EDGEGEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start edgegen serve");
        self.child = Some(child);
    }

    pub fn topics(&self) -> edgegen::mqtt::topics::Topics {
        edgegen::mqtt::topics::Topics::new("edgegen", &self.config.node).expect("topics")
    }

    pub fn output_dir(&self) -> PathBuf {
        self.config
            .output_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("images"))
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.config
            .state_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("state"))
            .join("spool")
    }

    pub fn spool_files(&self) -> Vec<PathBuf> {
        files_under(&self.spool_dir())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Resident memory of the daemon process (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The exit status if the daemon ends by itself within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_exit(self.child.as_mut().expect("running"), timeout);
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Waits until the log contains `text` (panics with the log after `timeout`).
    pub fn wait_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the daemon log after {timeout:?}:\n{log}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status (panics after 30 s).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(&child, "TERM");
        wait_exit(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("daemon did not exit within 30 s of SIGTERM\n{}", self.log())
        })
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.launch();
    }
}

/// Waits until the spool is empty: a spool file goes right after its result is
/// handed to the MQTT client, which can be a moment after a subscriber sees it.
pub fn wait_spool_empty(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.spool_files().is_empty() {
        assert!(
            Instant::now() < deadline,
            "spool not empty: {:?}",
            daemon.spool_files()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- daemon log ({}) ----\n{}",
                self.dir.display(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------- probe

/// One message the probe received.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{}: {e}: {}", self.topic, self.text()))
    }
}

#[derive(Default)]
struct ProbeState {
    messages: Vec<Msg>,
    subacks: usize,
    connacks: usize,
    filters: Vec<String>,
}

/// An MQTT 5 client that records everything it receives and renews its
/// subscriptions after every reconnect.
pub struct Probe {
    client: Client,
    state: Arc<(Mutex<ProbeState>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Probe {
    /// `persistent`: the broker keeps our subscriptions and queued messages while we are away.
    pub fn connect(port: u16, client_id: &str, persistent: bool) -> Probe {
        Probe::connect_as(port, client_id, persistent, None)
    }

    /// With a username and password.
    pub fn connect_as(
        port: u16,
        client_id: &str,
        persistent: bool,
        credentials: Option<(&str, &str)>,
    ) -> Probe {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_start(!persistent);
        options.set_max_packet_size(Some(64 << 20));
        if persistent {
            let mut props = options.connect_properties().unwrap_or_default();
            props.session_expiry_interval = Some(3600);
            options.set_connect_properties(props);
        }
        let (client, mut connection) = Client::new(options, 256);
        let state: Arc<(Mutex<ProbeState>, Condvar)> = Arc::default();
        let shared = state.clone();
        let resubscriber = client.clone();
        let thread = thread::spawn(move || {
            for event in connection.iter() {
                let (lock, changed) = &*shared;
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone().unwrap_or_default();
                        lock.lock().unwrap().messages.push(Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            response_topic: props.response_topic,
                            correlation: props.correlation_data.map(|d| d.to_vec()),
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => lock.lock().unwrap().subacks += 1,
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let mut s = lock.lock().unwrap();
                        s.connacks += 1;
                        for filter in &s.filters {
                            let _ = resubscriber.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => continue,
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
                changed.notify_all();
            }
        });
        let probe = Probe {
            client,
            state,
            thread: Some(thread),
        };
        probe.wait_until("connected", Duration::from_secs(10), |s| s.connacks > 0);
        probe
    }

    fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&ProbeState) -> bool) {
        let (lock, changed) = &*self.state;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap();
        while !done(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "probe: timed out waiting for {what}; got {} messages:\n{}",
                state.messages.len(),
                dump(&state.messages)
            );
            state = changed
                .wait_timeout(state, left.min(Duration::from_millis(200)))
                .unwrap()
                .0;
        }
    }

    /// Subscribes (QoS 1) and waits for the SUBACK.
    pub fn subscribe(&self, filter: &str) {
        self.subscribe_qos(filter, QoS::AtLeastOnce);
    }

    /// Subscribes with `qos` and waits for the SUBACK. (QoS 0 means the probe
    /// sends no PUBACKs, which keeps it from delaying its own next publish.)
    pub fn subscribe_qos(&self, filter: &str, qos: QoS) {
        let before = {
            let mut s = self.state.0.lock().unwrap();
            s.filters.push(filter.to_string());
            s.subacks
        };
        self.client.subscribe(filter, qos).expect("subscribe");
        self.wait_until("SUBACK", Duration::from_secs(10), |s| s.subacks > before);
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .expect("publish");
    }

    /// Publishes a retained message and waits until it comes back to this
    /// probe, which must be subscribed to `topic`: only then does the broker
    /// hold it, so a client that subscribes afterwards gets it as retained and
    /// never as a live message.
    pub fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        let payload = payload.into();
        let echoes = |msgs: &[Msg]| {
            msgs.iter()
                .filter(|m| m.topic == topic && m.payload == payload)
                .count()
        };
        let before = echoes(&self.messages());
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.clone())
            .expect("publish");
        self.wait(&format!("retained echo on {topic}"), WAIT, |msgs| {
            echoes(msgs) > before
        });
    }

    pub fn publish_with_response(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        response_topic: &str,
        correlation: &[u8],
    ) {
        let properties = PublishProperties {
            response_topic: Some(response_topic.to_string()),
            correlation_data: Some(correlation.to_vec().into()),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), properties)
            .expect("publish");
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.state.0.lock().unwrap().messages.clone()
    }

    /// Waits until `done` holds for the messages so far; returns them.
    pub fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&[Msg]) -> bool) -> Vec<Msg> {
        self.wait_until(what, timeout, |s| done(&s.messages));
        self.messages()
    }

    pub fn on_topic(&self, topic: &str) -> Vec<Msg> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Waits for the result of each id and returns them.
    pub fn results(
        &self,
        topics: &edgegen::mqtt::topics::Topics,
        ids: &[&str],
    ) -> BTreeMap<String, JobResult> {
        let wanted: Vec<String> = ids.iter().map(|id| topics.job_result(id)).collect();
        let messages = self.wait(&format!("results of {ids:?}"), WAIT, |msgs| {
            wanted.iter().all(|t| msgs.iter().any(|m| &m.topic == t))
        });
        ids.iter()
            .map(|id| {
                let topic = topics.job_result(id);
                let msg = messages.iter().find(|m| m.topic == topic).expect("result");
                (id.to_string(), msg.json())
            })
            .collect()
    }

    /// The states of every status message of one job, in arrival order.
    pub fn states(&self, topics: &edgegen::mqtt::topics::Topics, id: &str) -> Vec<Status> {
        self.on_topic(&topics.job_status(id))
            .iter()
            .map(|m| m.json())
            .collect()
    }

    /// Waits for a retained or live message on `topic` with this exact payload.
    pub fn wait_payload(&self, topic: &str, payload: &str, count: usize) {
        self.wait(&format!("{count}× {payload:?} on {topic}"), WAIT, |msgs| {
            msgs.iter()
                .filter(|m| m.topic == topic && m.payload == payload.as_bytes())
                .count()
                >= count
        });
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn dump(messages: &[Msg]) -> String {
    messages
        .iter()
        .map(|m| {
            let text = if m.payload.starts_with(b"\x89PNG") {
                format!("<png {} bytes>", m.payload.len())
            } else {
                m.text()
            };
            format!(
                "  {} {}",
                m.topic,
                text.chars().take(300).collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A done result: its file exists and has the sha256 the result names.
/// One request run to completion, so that the model is loaded before anything is measured.
pub fn warm_up(probe: &Probe, topics: &edgegen::mqtt::topics::Topics) {
    probe.publish(
        &topics.request(),
        r#"{"id":"warm-up","prompt":"a pear","seed":1}"#,
    );
    assert_stored(&probe.results(topics, &["warm-up"])["warm-up"]);
}

pub fn assert_stored(result: &JobResult) {
    assert_eq!(result.state, Some(JobState::Done), "{result:?}");
    let path = PathBuf::from(result.path.as_deref().expect("path"));
    let png = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(Some(sha256_hex(&png)), result.sha256, "{}", path.display());
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs::read(path.with_extension("json")).expect("sidecar"))
            .expect("sidecar JSON");
    assert_eq!(sidecar["sha256"].as_str(), result.sha256.as_deref());
    assert_eq!(sidecar["id"].as_str(), Some(result.id.as_str()));
}
