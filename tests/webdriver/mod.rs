//! Just enough of the W3C WebDriver protocol to drive Debian's headless
//! Chromium through `chromedriver` (package `chromium-driver`): open a page,
//! type, click, run a script, take a screenshot. Plain JSON over HTTP, so the
//! tests need no browser-automation crate.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::mqtt_support::{free_port, wait_for_port};

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// A cold Chromium start on a loaded 2-core machine can take a while.
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Browser {
    agent: ureq::Agent,
    base: String,
    session: Option<String>,
    driver: Child,
    log: PathBuf,
}

/// Chromium itself (not Debian's wrapper script, which only adds flags), or
/// the file `CHROMIUM_BIN` names.
fn chromium_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM_BIN") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn chromedriver_binary() -> Option<PathBuf> {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium whose page area is exactly
    /// `width` x `height` CSS pixels at scale 1. `dir` receives the driver's log.
    pub fn start(dir: &Path, width: u32, height: u32) -> Browser {
        let (Some(chromium), Some(chromedriver)) = (chromium_binary(), chromedriver_binary())
        else {
            panic!(
                "the kiosk browser test needs Chromium (/usr/lib/chromium/chromium, or \
                 $CHROMIUM_BIN) and chromedriver (/usr/bin/chromedriver), and one is missing: \
                 apt-get install -y chromium chromium-driver (.ci/run installs them)"
            );
        };
        fs::create_dir_all(dir).expect("browser dir");
        let port = free_port();
        let log = dir.join("chromedriver.log");
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(START_TIMEOUT))
            .build()
            .into();
        let mut browser = Browser {
            agent,
            base: format!("http://127.0.0.1:{port}"),
            session: None,
            driver,
            log,
        };
        wait_for_port(port, Duration::from_secs(30));
        let profile = dir.join("profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // CI runs as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--hide-scrollbars",
                    "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let value = browser.command("POST", "/session", Some(capabilities));
        let session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {value}"))
            .to_string();
        browser.session = Some(session);
        browser.set_viewport(width, height);
        browser
    }

    /// Makes the page area exactly `width` x `height` (the window size alone
    /// also counts the window's frame on some versions).
    pub fn set_viewport(&self, width: u32, height: u32) {
        self.session_command(
            "POST",
            "/goog/cdp/execute",
            Some(json!({
                "cmd": "Emulation.setDeviceMetricsOverride",
                "params": {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false},
            })),
        );
    }

    pub fn goto(&self, url: &str) {
        self.session_command("POST", "/url", Some(json!({ "url": url })));
    }

    /// The element matching a CSS selector.
    pub fn find(&self, css: &str) -> String {
        let value = self.session_command(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        value[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {value}"))
            .to_string()
    }

    pub fn type_into(&self, element: &str, text: &str) {
        self.session_command(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }

    pub fn click(&self, element: &str) {
        self.session_command(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        );
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.session_command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Polls `script` until it returns something other than null/false.
    pub fn wait_for(&self, what: &str, timeout: Duration, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.execute(script, args.clone());
            if !(value.is_null() || value == Value::Bool(false)) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "browser: timed out after {timeout:?} waiting for {what}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the page area.
    pub fn screenshot(&self) -> Vec<u8> {
        let value = self.session_command("GET", "/screenshot", None);
        let encoded = value.as_str().expect("screenshot is base64 text");
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("screenshot base64")
    }

    fn session_command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let session = self.session.as_deref().expect("a session");
        self.command(method, &format!("/session/{session}{path}"), body)
    }

    /// One WebDriver command; panics with the driver's error message.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or(json!({})).to_string()),
        };
        let mut response =
            response.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}\n{}", self.log()));
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: reading the answer: {e}"));
        let answer: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {text}"));
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status}: {answer}\n{}",
            self.log()
        );
        answer["value"].clone()
    }

    fn log(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Ends Chromium; errors do not matter any more.
            let url = format!("{}/session/{session}", self.base);
            let _ = self.agent.delete(&url).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
