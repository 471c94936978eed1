//! Kiosk mode: `edgegen serve` with `[kiosk] enabled`, against a real
//! Mosquitto, driven over its HTTP API and through the page in a headless
//! Chromium.
//!
//! Pictures are compared exactly (sha256 of the served bytes against the
//! stored file and the result), so there is no tolerance anywhere.

mod mqtt_support;
mod webdriver;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::Duration;

use edgegen::mqtt::messages::{ErrorCode, JobResult, JobState};
use mqtt_support::{assert_stored, free_port, pngs, sha256_hex, wait_for_port, DaemonConfig, WAIT};
use serde_json::{json, Value};
use webdriver::Browser;

/// The daemon setup of the MQTT tests, with the kiosk on and a client for it.
struct Setup {
    http: Http,
    daemon_setup: mqtt_support::Setup,
}

impl std::ops::Deref for Setup {
    type Target = mqtt_support::Setup;
    fn deref(&self) -> &Self::Target {
        &self.daemon_setup
    }
}

impl std::ops::DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.daemon_setup
    }
}

fn setup(name: &str, edit: impl FnOnce(&mut DaemonConfig)) -> Setup {
    let port = free_port();
    let daemon_setup = mqtt_support::setup(name, |config| {
        config.kiosk_listen = Some(format!("127.0.0.1:{port}"));
        edit(config);
    });
    wait_for_port(port, Duration::from_secs(30));
    Setup {
        http: Http::new(port),
        daemon_setup,
    }
}

// ---------------------------------------------------------------- HTTP

struct Http {
    agent: ureq::Agent,
    base: String,
}

/// Status, content type and body of one answer.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{e}: {} ({})",
                String::from_utf8_lossy(&self.body),
                self.status
            )
        })
    }

    /// The `error` object of an error answer.
    fn error(&self) -> Value {
        let json = self.json();
        assert!(json["error"].is_object(), "not an error: {json}");
        json["error"].clone()
    }
}

impl Http {
    fn new(port: u16) -> Http {
        let agent = ureq::Agent::config_builder()
            // 4xx/5xx are answers to check, not transport errors.
            .http_status_as_error(false)
            .timeout_global(Some(WAIT))
            .build()
            .into();
        Http {
            agent,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> Answer {
        let response = self.agent.get(&self.url(path)).call();
        Self::answer(path, response)
    }

    fn post(&self, path: &str, body: &str) -> Answer {
        let response = self
            .agent
            .post(&self.url(path))
            .header("Content-Type", "application/json")
            .send(body);
        Self::answer(path, response)
    }

    fn answer(
        path: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Answer {
        let mut response = response.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("{path}: reading the body: {e}"));
        Answer {
            status,
            content_type,
            body,
        }
    }

    /// Submits a request; its id.
    fn generate(&self, body: &str) -> String {
        let answer = self.post("/api/generate", body);
        assert_eq!(answer.status, 202, "{body}: {}", answer.json());
        answer.json()["id"].as_str().expect("id").to_string()
    }

    /// Every server-sent event of a job's stream, `(event, data)`, until the
    /// server closes it.
    fn events(&self, id: &str) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        self.events_each(id, |event| events.push(event));
        events
    }

    /// Hands each event of a job's stream to `each` as it arrives.
    fn events_each(&self, id: &str, mut each: impl FnMut((String, Value))) {
        let path = format!("/api/jobs/{id}/events");
        let response = self
            .agent
            .get(&self.url(&path))
            .call()
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let content_type = response.headers().get("content-type").cloned();
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("text/event-stream"),
            "{path}"
        );
        let reader = BufReader::new(response.into_body().into_reader());
        let (mut name, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let line = line.unwrap_or_else(|e| panic!("{path}: {e}"));
            if let Some(value) = line.strip_prefix("event:") {
                name = value.trim().to_string();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let json =
                    serde_json::from_str(&data).unwrap_or_else(|e| panic!("{path}: {e}: {data}"));
                each((std::mem::take(&mut name), json));
                data.clear();
            }
        }
    }

    /// The final result of a job, from its event stream.
    fn result(&self, id: &str) -> JobResult {
        let events = self.events(id);
        let (name, data) = events.last().expect("events");
        assert_eq!(name, "result", "{events:?}");
        serde_json::from_value(data.clone()).expect("result JSON")
    }

    fn gallery(&self, limit: usize) -> Vec<Value> {
        let answer = self.get(&format!("/api/images?limit={limit}"));
        assert_eq!(answer.status, 200);
        answer.json()["images"].as_array().expect("images").clone()
    }
}

// ---------------------------------------------------------------- API

#[test]
fn generate_follow_events_and_fetch_the_picture() {
    let s = setup("kiosk-happy", |_| {});
    let id = s
        .http
        .generate(r#"{"id":"k-apple","prompt":"a red apple on a tree","seed":42}"#);
    assert_eq!(id, "k-apple");

    let events = s.http.events(&id);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let (last, statuses) = names.split_last().expect("events");
    assert_eq!(*last, "result", "{names:?}");
    assert!(
        !statuses.is_empty() && statuses.iter().all(|n| *n == "status"),
        "{names:?}"
    );
    // States only move forward: queued → running (steps counting up) → done.
    let order = |state: &str| {
        ["queued", "running", "done"]
            .iter()
            .position(|s| *s == state)
    };
    let progress: Vec<(usize, u64)> = events[..events.len() - 1]
        .iter()
        .map(|(_, data)| {
            let state = data["state"].as_str().expect("state");
            let rank = order(state).unwrap_or_else(|| panic!("state {state}"));
            (rank, data["step"].as_u64().expect("step"))
        })
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last().map(|p| p.0), Some(2), "ends with done");

    let result: JobResult = serde_json::from_value(events[events.len() - 1].1.clone()).unwrap();
    assert_stored(&result);
    assert_eq!((result.seed, result.steps), (Some(42), Some(4)));
    let date = chrono::Local::now().format("%Y-%m-%d").to_string();
    let url = format!("/images/{date}/k-apple.png");
    assert_eq!(events[events.len() - 1].1["image_urls"], json!([url]));

    // The served bytes are the stored file, whose sha256 the result names.
    let served = s.http.get(&url);
    assert_eq!(served.status, 200);
    assert_eq!(served.content_type, "image/png");
    let stored = fs::read(s.daemon.output_dir().join(&date).join("k-apple.png")).unwrap();
    assert_eq!(served.body, stored);
    assert_eq!(Some(sha256_hex(&served.body)), result.sha256);

    // The same job over MQTT: one code path, one result.
    let over_mqtt = &s.probe.results(&s.topics, &["k-apple"])["k-apple"];
    assert_eq!(over_mqtt.sha256, result.sha256);

    // After the end, the job and its stream answer from storage.
    let job = s.http.get("/api/jobs/k-apple");
    assert_eq!(job.status, 200);
    assert_eq!(job.json()["state"], "done");
    assert_eq!(job.json()["sha256"].as_str(), result.sha256.as_deref());
    let again = s.http.events("k-apple");
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, "result");

    // The page and its assets come from the binary.
    let page = s.http.get("/");
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains(r#"id="generate""#) && html.contains("/assets/kiosk.js"));
    for (asset, kind) in [
        ("kiosk.js", "text/javascript"),
        ("kiosk.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
    ] {
        let answer = s.http.get(&format!("/assets/{asset}"));
        assert_eq!(answer.status, 200, "{asset}");
        assert!(
            answer.content_type.starts_with(kind),
            "{asset}: {}",
            answer.content_type
        );
    }

    // Models as in the retained MQTT message, plus the limits.
    let models = s.http.get("/api/models").json();
    assert_eq!(models["default"], "tiny-random-sd");
    assert!(models["models"]
        .as_array()
        .expect("models")
        .iter()
        .any(|m| m["id"] == "tiny-random-sd" && m["kind"] == "diffusion"));
    assert_eq!(models["limits"]["max_prompt_chars"], 200);
}

#[test]
fn invalid_requests_are_400_naming_the_field() {
    let s = setup("kiosk-invalid", |c| c.max_payload_bytes = 4096);
    let too_large = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(5000));
    let long_prompt = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(201));
    // (payload, code, field named in the error)
    let cases: Vec<(&str, ErrorCode, Option<&str>)> = vec![
        (
            r#"{"prompt":"x","steps":"many"}"#,
            ErrorCode::InvalidRequest,
            Some("steps"),
        ),
        (
            r#"{"prompt":"x","steps":0}"#,
            ErrorCode::InvalidRequest,
            Some("steps"),
        ),
        (
            r#"{"prompt":"x","colour":"red"}"#,
            ErrorCode::InvalidRequest,
            Some("colour"),
        ),
        (
            r#"{"prompt":"x","width":65}"#,
            ErrorCode::InvalidRequest,
            Some("width"),
        ),
        (
            r#"{"id":"a/b","prompt":"x"}"#,
            ErrorCode::InvalidRequest,
            Some("id"),
        ),
        (&long_prompt, ErrorCode::InvalidRequest, Some("prompt")),
        (
            r#"{"prompt":"x","model":"no-such-model"}"#,
            ErrorCode::UnknownModel,
            Some("model"),
        ),
        (&too_large, ErrorCode::TooLarge, None),
        ("", ErrorCode::InvalidRequest, Some("prompt")),
    ];
    for (payload, code, field) in cases {
        let answer = s.http.post("/api/generate", payload);
        let short: String = payload.chars().take(60).collect();
        assert_eq!(answer.status, 400, "{short}: {}", answer.json());
        assert!(
            answer.content_type.starts_with("application/json"),
            "{short}"
        );
        let error = answer.error();
        assert_eq!(error["code"], json!(code), "{short}: {error}");
        assert_eq!(error["field"].as_str(), field, "{short}: {error}");
        assert!(
            !error["message"].as_str().unwrap_or("").is_empty(),
            "{short}"
        );
    }
    // Ids and dates in paths are checked before anything is looked up.
    for (path, status, field) in [
        ("/api/jobs/no%20such", 400, Some("id")),
        ("/api/jobs/nobody-asked", 404, Some("id")),
        ("/api/jobs/x.y/events", 400, Some("id")),
        ("/api/images?limit=0", 400, Some("limit")),
        ("/api/images?limit=100000", 400, Some("limit")),
        ("/images/2026-13-xx/a.png", 400, Some("date")),
        ("/images/..%2F..%2Fetc/passwd.png", 400, Some("date")),
        ("/images/2026-01-01/..%2Fx.png", 400, Some("id")),
        ("/images/2026-01-01/a.json", 400, Some("file")),
        ("/images/2026-01-01/missing.png", 404, None),
        ("/nothing/here", 404, None),
    ] {
        let answer = s.http.get(path);
        assert_eq!(answer.status, status, "{path}");
        assert_eq!(answer.error()["field"].as_str(), field, "{path}");
    }
    // Another web site's page cannot make the visitor's browser generate.
    let response = s
        .http
        .agent
        .post(&s.http.url("/api/generate"))
        .header("Origin", "http://elsewhere.example")
        .send("a picture nobody asked for");
    let answer = Http::answer("/api/generate", response);
    assert_eq!(answer.status, 403);
    assert_eq!(answer.error()["code"], "invalid_request");
    assert!(pngs(&s.daemon).is_empty(), "{:?}", pngs(&s.daemon));
}

#[test]
fn full_queue_answers_429_busy() {
    let s = setup("kiosk-busy", |c| c.queue = 2);
    // Slow enough (first model load, 50 steps) that none finishes while the
    // four are submitted; the daemon handles submissions one at a time.
    let mut answers = BTreeMap::new();
    for i in 1..=4 {
        let payload =
            format!(r#"{{"id":"q{i}","prompt":"p","steps":50,"width":128,"height":128}}"#);
        answers.insert(i, s.http.post("/api/generate", &payload));
    }
    for i in [1, 2] {
        assert_eq!(answers[&i].status, 202, "q{i}: {}", answers[&i].json());
    }
    for i in [3, 4] {
        let answer = &answers[&i];
        assert_eq!(answer.status, 429, "q{i}: {}", answer.json());
        assert_eq!(answer.error()["code"], "busy");
        // Never queued: no such job.
        assert_eq!(s.http.get(&format!("/api/jobs/q{i}")).status, 404);
    }
    for id in ["q1", "q2"] {
        assert_stored(&s.http.result(id));
    }
}

#[test]
fn mqtt_request_shows_up_in_the_gallery() {
    let s = setup("kiosk-gallery", |_| {});
    let first = s.http.generate(r#"{"prompt":"made on the page","seed":1}"#);
    assert_eq!(s.http.result(&first).state, Some(JobState::Done));
    s.probe.publish(
        &s.topics.request(),
        r#"{"id":"from-mqtt","prompt":"a boat on a lake","seed":7,"steps":3}"#,
    );
    let result = &s.probe.results(&s.topics, &["from-mqtt"])["from-mqtt"];
    assert_stored(result);

    let gallery = s.http.gallery(10);
    assert_eq!(gallery.len(), 2, "{gallery:?}");
    let item = &gallery[0];
    assert_eq!(item["id"], "from-mqtt", "newest first: {gallery:?}");
    assert_eq!(item["prompt"], "a boat on a lake");
    assert_eq!(
        (&item["seed"], &item["steps"], &item["model"]),
        (&json!(7), &json!(3), &json!("tiny-random-sd"))
    );
    assert_eq!(item["sha256"].as_str(), result.sha256.as_deref());
    let served = s.http.get(item["url"].as_str().expect("url"));
    assert_eq!(Some(sha256_hex(&served.body)), result.sha256);
    assert_eq!(gallery[1]["prompt"], "made on the page");
    assert_eq!(s.http.gallery(1).len(), 1, "limit holds");
}

#[test]
fn cancel_and_shutdown_end_event_streams() {
    let mut s = setup("kiosk-stop", |_| {});
    // Long enough to still be running when the daemon is told to stop.
    let slow = s
        .http
        .generate(r#"{"id":"slow","prompt":"p","steps":50,"width":256,"height":256}"#);
    let waiting = s.http.generate(r#"{"id":"waiting","prompt":"p"}"#);
    let job = s.http.get("/api/jobs/waiting").json();
    assert_eq!(
        (&job["state"], &job["queue_position"]),
        (&json!("queued"), &json!(1)),
        "{job}"
    );

    let cancelled = s.http.post("/api/jobs/waiting/cancel", "");
    assert_eq!(cancelled.status, 202);
    let result = s.http.result(&waiting);
    assert_eq!(result.state, Some(JobState::Cancelled), "{result:?}");
    assert_eq!(result.error.map(|e| e.code), Some(ErrorCode::Cancelled));

    // A stream open on the running job ends when the daemon stops, and the
    // daemon stops promptly with it open.
    let base = s.http.base.clone();
    let (sender, received) = std::sync::mpsc::channel();
    let follower = std::thread::spawn(move || {
        let http = Http {
            agent: Http::new(0).agent,
            base,
        };
        http.events_each(&slow, |event| {
            let _ = sender.send(event);
        })
    });
    let deadline = std::time::Instant::now() + WAIT;
    let mut events = Vec::new();
    // The stream is open once its first event (the current state) is in.
    while !events
        .iter()
        .any(|(_, data): &(String, Value)| data["state"] == "running")
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match received.recv_timeout(left) {
            Ok(event) => events.push(event),
            Err(e) => panic!("no running status for the slow job: {e}; {events:?}"),
        }
    }
    let started = std::time::Instant::now();
    assert!(s.daemon.terminate().success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    follower.join().expect("follower");
    events.extend(received.try_iter());
    assert!(
        !events.is_empty() && events.iter().all(|(name, _)| name == "status"),
        "{events:?}"
    );
}

// ---------------------------------------------------------------- the page

/// Where to save the screenshot of the page with its picture (the README's
/// copy is docs/img/kiosk-800x480.png).
const SCREENSHOT_ENV: &str = "KIOSK_SCREENSHOT";

/// Layout facts the page must meet at any kiosk size: nothing scrolls, and
/// the prompt, Generate button, picture and gallery are all on screen.
const LAYOUT_SCRIPT: &str = r#"
const inside = (id) => {
  const r = document.getElementById(id).getBoundingClientRect();
  return r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0
    && r.right <= innerWidth + 0.5 && r.bottom <= innerHeight + 0.5;
};
const root = document.documentElement;
return {
  width: innerWidth, height: innerHeight,
  overflow: root.scrollWidth > innerWidth || root.scrollHeight > innerHeight,
  visible: ["prompt", "generate", "picture", "gallery"].filter(inside),
  generate_height: document.getElementById("generate").getBoundingClientRect().height,
};
"#;

fn check_layout(browser: &Browser, width: u32, height: u32) {
    let layout = browser.execute(LAYOUT_SCRIPT, json!([]));
    assert_eq!(
        (&layout["width"], &layout["height"]),
        (&json!(width), &json!(height)),
        "{layout}"
    );
    assert_eq!(layout["overflow"], false, "{width}x{height}: {layout}");
    assert_eq!(
        layout["visible"],
        json!(["prompt", "generate", "picture", "gallery"]),
        "{width}x{height}: {layout}"
    );
    // A finger-sized button (48 CSS px is the usual minimum).
    assert!(
        layout["generate_height"].as_f64().unwrap_or(0.0) >= 48.0,
        "{layout}"
    );
}

#[test]
fn page_generates_a_picture_at_800x480() {
    let s = setup("kiosk-page", |_| {});
    // A few earlier pictures, so that the gallery has something to show. The
    // bundled scenes GAN draws recognisable objects (the tiny diffusion model
    // only makes noise), which makes a better screenshot.
    let earlier = [
        r#"{"prompt":"a yellow sun","model":"scenes-gan","seed":3}"#,
        r#"{"prompt":"a blue house","model":"scenes-gan","seed":5}"#,
        r#"{"prompt":"a green tree","model":"scenes-gan","seed":8}"#,
    ];
    let mut known = Vec::new();
    for request in earlier {
        let id = s.http.generate(request);
        assert_eq!(s.http.result(&id).state, Some(JobState::Done));
        known.push(id);
    }

    let browser = Browser::start(&s.dir.path().join("browser"), 800, 480);
    browser.goto(&s.http.url("/"));
    browser.wait_for(
        "the gallery",
        WAIT,
        "return document.querySelectorAll('#gallery .card').length === 3",
        json!([]),
    );
    // Advanced: the model and a seed, then closed again.
    browser.click(&browser.find("#advanced-toggle"));
    browser.wait_for(
        "the model list",
        WAIT,
        "return document.querySelector('#model option[value=\"scenes-gan\"]') !== null",
        json!([]),
    );
    browser.click(&browser.find(r#"#model option[value="scenes-gan"]"#));
    browser.type_into(&browser.find("#seed"), "7");
    browser.click(&browser.find("#advanced-toggle"));
    browser.type_into(&browser.find("#prompt"), "a red apple");
    browser.click(&browser.find("#generate"));
    // The new job's picture, loaded and shown.
    let id = browser.wait_for(
        "the picture",
        WAIT,
        r#"const img = document.getElementById('picture');
           const id = img.dataset.job || '';
           const ready = !img.hidden && img.complete && img.naturalWidth > 0
             && id !== '' && !arguments[0].includes(id)
             && img.currentSrc.endsWith('/' + id + '.png');
           return ready ? id : null;"#,
        json!([known]),
    );
    let id = id.as_str().expect("job id").to_string();
    let job = s.http.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(job["state"], "done", "{job}");
    let gallery = s.http.gallery(1);
    let newest = &gallery[0];
    assert_eq!(newest["id"], json!(id));
    assert_eq!(
        (&newest["prompt"], &newest["model"], &newest["seed"]),
        (&json!("a red apple"), &json!("scenes-gan"), &json!(7)),
        "{newest}"
    );

    browser.wait_for(
        "the new picture in the gallery",
        WAIT,
        "return document.querySelectorAll('#gallery .card').length === 4",
        json!([]),
    );
    check_layout(&browser, 800, 480);
    let shot = browser.screenshot();
    let decoded = image::load_from_memory(&shot).expect("screenshot is a picture");
    assert_eq!((decoded.width(), decoded.height()), (800, 480));
    if let Some(path) = std::env::var_os(SCREENSHOT_ENV) {
        let path = PathBuf::from(path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).expect("screenshot dir");
        }
        fs::write(&path, &shot).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    // The same page on a 1080p screen, with the advanced settings open.
    browser.set_viewport(1920, 1080);
    browser.click(&browser.find("#advanced-toggle"));
    browser.wait_for(
        "the advanced settings",
        WAIT,
        "return !document.getElementById('advanced').hidden \
         && document.querySelectorAll('#model option').length > 1",
        json!([]),
    );
    check_layout(&browser, 1920, 1080);
}
