//! `edgegen request`: publishes one request to a running daemon, follows its
//! status messages, and saves the picture that comes back with the result.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::Config;
use crate::daemon::intake;
use crate::generate::hex_sha256;
use crate::mqtt::client::{self, Backoff, ClientEvent, ConnectSettings};
use crate::mqtt::messages::{ErrorBody, ErrorCode, JobResult, JobState, Status};
use crate::mqtt::topics::{self, Topics};
use crate::request::Request;
use crate::storage::write_atomic;

/// What to send and where.
#[derive(Clone, Debug)]
pub struct RequestOptions {
    pub request: Request,
    /// `mqtt://host:port`; default: the configured broker (the embedded one's `mqtt.listen`).
    pub broker: Option<String>,
    /// Node id of the daemon; default: `mqtt.node_id` or this host's name.
    pub node: Option<String>,
    /// Publish to the fleet topic; the result comes from whichever node took it.
    pub fleet: bool,
    /// Where to save the picture; default `<id>.png` in the current directory.
    pub output: Option<PathBuf>,
    pub timeout: Duration,
}

/// The daemon's answer and where the picture was saved.
#[derive(Debug)]
pub struct Answer {
    pub result: JobResult,
    pub saved: Option<PathBuf>,
    /// The node that answered.
    pub node: String,
}

/// The daemon answered with an error result.
#[derive(Debug)]
pub struct Refused(pub ErrorBody);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0.code, self.0.message)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// True when the request itself was at fault (a usage error for the CLI).
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self.0.code,
            ErrorCode::InvalidRequest | ErrorCode::UnknownModel | ErrorCode::TooLarge
        )
    }
}

pub fn run(config: &Config, options: RequestOptions) -> Result<Answer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(request(config, options))
}

/// The broker the daemon of this configuration uses.
pub fn default_broker(config: &Config) -> String {
    match config.mqtt.broker.as_str() {
        "embedded" => format!("mqtt://{}", config.mqtt.listen),
        url => url.to_string(),
    }
}

async fn request(config: &Config, options: RequestOptions) -> Result<Answer> {
    let node = options
        .node
        .clone()
        .unwrap_or_else(|| topics::node_id(&config.mqtt.node_id));
    let topics = Topics::new(&config.mqtt.prefix, &node)?;
    let broker = options
        .broker
        .clone()
        .unwrap_or_else(|| default_broker(config));
    let endpoint = client::parse_broker_url(&broker)?;
    let mut settings =
        ConnectSettings::new(endpoint, format!("edgegen-request-{}", intake::new_id()))
            .with_credentials(&config.mqtt)?;
    settings.max_incoming_packet = 64 << 20;
    let backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };
    let (client, mut events, task) = client::connect(&settings, 64, backoff)?;

    let mut request = options.request.clone();
    let id = match request.id.clone() {
        Some(id) => {
            intake::check_id(&id).map_err(|reason| anyhow!("--id {reason}"))?;
            id
        }
        None => intake::new_id(),
    };
    request.id = Some(id.clone());
    request.return_image = true;
    let payload = serde_json::to_vec(&request).context("encoding the request")?;

    let follow = Follow {
        topics: &topics,
        id: &id,
        fleet: options.fleet,
        client: &client,
        payload,
        progress: progress_bar(),
    };
    let outcome = tokio::time::timeout(options.timeout, follow.run(&mut events)).await;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    let (result, image, node) = match outcome {
        Ok(answer) => answer?,
        Err(_) => {
            let from = if options.fleet {
                "any node of the fleet".to_string()
            } else {
                format!("node '{node}'")
            };
            bail!(
                "no result for job {id} from {from} within {} s (is `edgegen serve` running and connected to {broker}?)",
                options.timeout.as_secs()
            )
        }
    };
    if let Some(error) = result.error.clone() {
        return Err(Refused(error).into());
    }
    let saved = save_picture(
        &result,
        image,
        options
            .output
            .unwrap_or_else(|| PathBuf::from(format!("{id}.png"))),
    )?;
    Ok(Answer {
        result,
        saved,
        node,
    })
}

struct Follow<'a> {
    topics: &'a Topics,
    id: &'a str,
    fleet: bool,
    client: &'a AsyncClient,
    payload: Vec<u8>,
    progress: ProgressBar,
}

impl Follow<'_> {
    /// Subscribes to the job's topics, publishes the request once subscribed,
    /// and collects messages until the result arrives: the result, the
    /// picture and the node that answered.
    async fn run(
        &self,
        events: &mut UnboundedReceiver<ClientEvent>,
    ) -> Result<(JobResult, Option<Vec<u8>>, String)> {
        let mut published = false;
        let mut image = None;
        while let Some(event) = events.recv().await {
            match event {
                ClientEvent::Connected { .. } => {
                    // A clean session: after a reconnect the subscription must be made again.
                    self.client
                        .subscribe(self.job_filter(), QoS::AtLeastOnce)
                        .await?;
                }
                ClientEvent::Subscribed if !published => {
                    let destination = if self.fleet {
                        self.topics.fleet_request()
                    } else {
                        self.topics.request()
                    };
                    self.client
                        .publish(destination, QoS::AtLeastOnce, false, self.payload.clone())
                        .await?;
                    published = true;
                    self.progress.set_message("sent");
                }
                ClientEvent::Subscribed => {}
                ClientEvent::Disconnected(reason) => self
                    .progress
                    .set_message(format!("reconnecting ({reason})")),
                ClientEvent::Publish(publish) => {
                    if let Some(answer) = self.on_message(&publish, &mut image)? {
                        self.progress.finish_and_clear();
                        return Ok((answer.0, image, answer.1));
                    }
                }
            }
        }
        bail!("MQTT connection closed")
    }

    /// The job's topics on its node; in fleet mode on any node, as the
    /// request goes to whichever daemon of the group takes it.
    fn job_filter(&self) -> String {
        if self.fleet {
            format!("{}/+/job/{}/#", self.topics.prefix(), self.id)
        } else {
            self.topics.job_filter(self.id)
        }
    }

    /// The result and the node that sent it, once it arrives.
    fn on_message(
        &self,
        publish: &Publish,
        image: &mut Option<Vec<u8>>,
    ) -> Result<Option<(JobResult, String)>> {
        let topic = String::from_utf8_lossy(&publish.topic);
        let Some(node) = topic.split('/').nth(1) else {
            return Ok(None);
        };
        let Ok(sender) = Topics::new(self.topics.prefix(), node) else {
            return Ok(None);
        };
        if topic == sender.job_result(self.id) {
            let result: JobResult =
                serde_json::from_slice(&publish.payload).context("parsing the result")?;
            return Ok(Some((result, node.to_string())));
        }
        if topic == sender.job_image(self.id, 0) {
            *image = Some(publish.payload.to_vec());
        } else if topic == sender.job_status(self.id) {
            if let Ok(status) = serde_json::from_slice::<Status>(&publish.payload) {
                self.show(&status);
            }
        }
        Ok(None)
    }

    fn show(&self, status: &Status) {
        self.progress.set_length(u64::from(status.steps.max(1)));
        self.progress.set_position(u64::from(status.step));
        match status.state {
            JobState::Queued => self
                .progress
                .set_message(format!("queued, position {}", status.queue_position)),
            JobState::Running => self.progress.set_message("running"),
            other => self
                .progress
                .set_message(format!("{other:?}").to_lowercase()),
        }
    }
}

fn progress_bar() -> ProgressBar {
    // Hidden when stderr is not a terminal.
    let bar = ProgressBar::new(1);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>20} [{bar:30}] {pos}/{len} steps {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Writes the received PNG after checking it against the result's sha256.
fn save_picture(
    result: &JobResult,
    image: Option<Vec<u8>>,
    output: PathBuf,
) -> Result<Option<PathBuf>> {
    let Some(png) = image else {
        log::warn!(
            "no picture came back (too large for the broker?); it is stored on the daemon at {}",
            result.path.as_deref().unwrap_or("?")
        );
        return Ok(None);
    };
    if let Some(expected) = &result.sha256 {
        let got = hex_sha256(&png);
        if &got != expected {
            bail!("received picture has sha256 {got}, the daemon stored {expected}");
        }
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_atomic(&output, &png).with_context(|| format!("writing {}", output.display()))?;
    Ok(Some(output))
}
