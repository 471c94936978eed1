//! The MQTT 5 connection: broker URLs, connect options (persistent session,
//! manual acks, Last Will, TLS, credentials) and the task that drives
//! rumqttc's event loop, reconnecting with back-off forever.
//!
//! MQTT 5 (rumqttc's `v5` module) because requests may carry a Response Topic
//! and Correlation Data, which MQTT 3.1.1 cannot express.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, LastWill, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, Transport};
use tokio::sync::mpsc;

use super::relay::Relay;

/// Where a broker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Endpoint {
    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

/// Parses `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883);
/// `tcp://` and `ssl://` are accepted as synonyms, and a bare `host:port` means `mqtt://`.
pub fn parse_broker_url(url: &str) -> Result<Endpoint> {
    let (tls, rest) = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => (false, rest),
        Some(("mqtts" | "ssl", rest)) => (true, rest),
        Some((scheme, _)) => {
            bail!("broker URL '{url}': unknown scheme '{scheme}' (use mqtt:// or mqtts://)")
        }
        None => (false, url),
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| anyhow!("broker URL '{url}': unclosed '[' in IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => parse_port(url, port)?,
            None if after.is_empty() => default_port,
            None => bail!("broker URL '{url}': unexpected '{after}' after the address"),
        };
        (host.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), parse_port(url, port)?),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() {
        bail!("broker URL '{url}': no host");
    }
    Ok(Endpoint { host, port, tls })
}

fn parse_port(url: &str, port: &str) -> Result<u16> {
    port.parse()
        .map_err(|_| anyhow!("broker URL '{url}': port '{port}' is not a number from 0 to 65535"))
}

/// Everything needed to open a connection.
#[derive(Clone, Debug)]
pub struct ConnectSettings {
    pub endpoint: Endpoint,
    pub client_id: String,
    /// `false`: the broker keeps subscriptions and queued QoS 1 messages while we are away.
    pub persistent: bool,
    pub manual_acks: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    /// Retained QoS 1 message the broker publishes when we vanish.
    pub last_will: Option<(String, Vec<u8>)>,
    /// Largest packet we accept; the broker drops larger ones for us.
    pub max_incoming_packet: u32,
    pub keep_alive: Duration,
    /// Unix socket for a relay that sets `TCP_NODELAY` (plain TCP brokers only).
    pub relay_socket: Option<PathBuf>,
    /// QoS 1 messages the broker may have in flight to us at once (MQTT 5
    /// Receive Maximum); `None` leaves the broker's default.
    pub receive_maximum: Option<u16>,
}

impl ConnectSettings {
    pub fn new(endpoint: Endpoint, client_id: impl Into<String>) -> Self {
        ConnectSettings {
            endpoint,
            client_id: client_id.into(),
            persistent: false,
            manual_acks: false,
            username: None,
            password: None,
            ca_file: None,
            last_will: None,
            max_incoming_packet: 16 << 20,
            keep_alive: Duration::from_secs(30),
            relay_socket: None,
            receive_maximum: None,
        }
    }

    /// Credentials and CA from `[mqtt]`: `username`, `password_file`, `ca_file`.
    pub fn with_credentials(mut self, mqtt: &crate::config::MqttConfig) -> Result<Self> {
        if !mqtt.username.is_empty() {
            self.username = Some(mqtt.username.clone());
            self.password = Some(if mqtt.password_file.as_os_str().is_empty() {
                String::new()
            } else {
                read_password(&mqtt.password_file)?
            });
        }
        if !mqtt.ca_file.as_os_str().is_empty() {
            self.ca_file = Some(mqtt.ca_file.clone());
        }
        Ok(self)
    }

    pub fn options(&self) -> Result<MqttOptions> {
        self.options_to(None)
    }

    /// Options for connecting straight to the broker, or to a relay's Unix socket.
    fn options_to(&self, relay: Option<&Path>) -> Result<MqttOptions> {
        if self.client_id.is_empty() {
            bail!("MQTT client id is empty");
        }
        let mut options = match relay {
            Some(path) => {
                let mut options = MqttOptions::new(&self.client_id, path.to_string_lossy(), 0);
                options.set_transport(Transport::Unix);
                options
            }
            None => MqttOptions::new(&self.client_id, &self.endpoint.host, self.endpoint.port),
        };
        options.set_keep_alive(self.keep_alive);
        options.set_clean_start(!self.persistent);
        options.set_manual_acks(self.manual_acks);
        let mut properties = ConnectProperties::new();
        properties.max_packet_size = Some(self.max_incoming_packet);
        properties.receive_maximum = self.receive_maximum;
        if self.persistent {
            // MQTT 5 ends a session when the connection closes unless an expiry is given.
            properties.session_expiry_interval = Some(u32::MAX);
        }
        options.set_connect_properties(properties);
        if let Some(user) = &self.username {
            options.set_credentials(user, self.password.clone().unwrap_or_default());
        }
        if let Some((topic, payload)) = &self.last_will {
            options.set_last_will(LastWill::new(
                topic,
                payload.clone(),
                QoS::AtLeastOnce,
                true,
                None,
            ));
        }
        if self.endpoint.tls && relay.is_none() {
            options.set_transport(match &self.ca_file {
                Some(path) => {
                    let ca = std::fs::read(path)
                        .with_context(|| format!("cannot read mqtt.ca_file {}", path.display()))?;
                    Transport::tls(ca, None, None)
                }
                None => Transport::tls_with_default_config(),
            });
        } else if self.ca_file.is_some() {
            log::warn!(
                "mqtt.ca_file is set but the broker URL is not mqtts://; connecting without TLS"
            );
        }
        Ok(options)
    }
}

pub(crate) fn read_password(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read mqtt.password_file {}", path.display()))?;
    // The first line; a trailing newline (as editors write it) is not part of the password.
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// What the connection task reports.
#[derive(Debug)]
pub enum ClientEvent {
    /// A CONNACK: subscriptions must be (re)made now.
    Connected {
        session_present: bool,
        /// The broker's Maximum Packet Size, when it announced one.
        max_packet: Option<u32>,
    },
    Disconnected(String),
    /// A SUBACK: a subscription is in place.
    Subscribed,
    Publish(Publish),
}

/// Back-off between reconnection attempts: doubles from `min` up to `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Opens a client and spawns the task that polls its event loop.
pub fn connect(
    settings: &ConnectSettings,
    channel_capacity: usize,
    backoff: Backoff,
) -> Result<(
    AsyncClient,
    mpsc::UnboundedReceiver<ClientEvent>,
    tokio::task::JoinHandle<()>,
)> {
    let relay = start_relay(settings);
    let options = settings.options_to(relay.as_ref().map(Relay::path))?;
    let (client, eventloop) = AsyncClient::new(options, channel_capacity);
    let (tx, rx) = mpsc::unbounded_channel();
    let endpoint = settings.endpoint.to_string();
    let task = tokio::spawn(async move {
        // The relay lives exactly as long as the connection task.
        let _relay = relay;
        drive(eventloop, tx, backoff, endpoint).await
    });
    Ok((client, rx, task))
}

/// The relay for plain TCP connections when a socket path is configured;
/// without it (TLS, or it cannot start) the client connects directly.
fn start_relay(settings: &ConnectSettings) -> Option<Relay> {
    let path = settings
        .relay_socket
        .as_ref()
        .filter(|_| !settings.endpoint.tls)?;
    match Relay::start(path, settings.endpoint.authority()) {
        Ok(relay) => Some(relay),
        Err(err) => {
            log::warn!("connecting to the broker directly (no TCP_NODELAY relay: {err:#})");
            None
        }
    }
}

/// Polls the event loop until we disconnect on purpose or nobody listens any more.
/// Never blocks on anything but the network, so keep-alives go on whatever
/// the rest of the process is doing.
async fn drive(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<ClientEvent>,
    backoff: Backoff,
    endpoint: String,
) {
    let mut delay = backoff.min;
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                delay = backoff.min;
                log::debug!(
                    "connected to MQTT broker {endpoint} (session present: {})",
                    ack.session_present
                );
                let max_packet = ack.properties.as_ref().and_then(|p| p.max_packet_size);
                ClientEvent::Connected {
                    session_present: ack.session_present,
                    max_packet,
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => ClientEvent::Publish(publish),
            Ok(Event::Incoming(Packet::SubAck(_))) => ClientEvent::Subscribed,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                log::debug!("disconnected from {endpoint} on request");
                return;
            }
            Ok(_) => continue,
            Err(ConnectionError::RequestsDone) => return,
            Err(err) => {
                log::warn!("MQTT connection to {endpoint}: {err}; retrying in {delay:?}");
                if tx.send(ClientEvent::Disconnected(err.to_string())).is_err() {
                    return;
                }
                tokio::time::sleep(jittered(delay)).await;
                delay = (delay * 2).min(backoff.max);
                continue;
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// `delay` plus up to a quarter more, so a fleet does not reconnect in lockstep.
fn jittered(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let quarter = delay.as_nanos() as u64 / 4;
    if quarter == 0 {
        return delay;
    }
    delay + Duration::from_nanos(u64::from(nanos) % quarter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let e = parse_broker_url("mqtt://broker.local:1884").unwrap();
        assert_eq!(
            e,
            Endpoint {
                host: "broker.local".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(parse_broker_url("mqtts://h").unwrap().port, 8883);
        assert_eq!(parse_broker_url("mqtt://h").unwrap().port, 1883);
        assert_eq!(parse_broker_url("127.0.0.1:1999").unwrap().port, 1999);
        let v6 = parse_broker_url("mqtt://[::1]:2000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 2000));
        assert_eq!(v6.to_string(), "mqtt://[::1]:2000");
        assert!(parse_broker_url("http://h:1").is_err());
        assert!(parse_broker_url("mqtt://h:port").is_err());
        assert!(parse_broker_url("mqtt://:1883").is_err());
    }
}
