//! The embedded broker (`mqtt.broker = "embedded"`): rumqttd inside the
//! daemon, so a stand-alone kiosk needs no other service.
//!
//! rumqttd serves MQTT 3.1.1 and MQTT 5 on separate listeners. Both run on
//! private loopback ports; `mqtt.listen` is a small front that reads each
//! client's CONNECT, sees which protocol level it speaks and splices the
//! connection to the matching listener. So `mosquitto_pub` (3.1.1 by default)
//! and MQTT 5 clients share one address, and the daemon itself connects
//! straight to the MQTT 5 listener. The front also gives clients that send an
//! empty client id one of their own, as the MQTT specification has the server
//! do (rumqttd refuses empty ids; `mosquitto_pub` sends one).
//!
//! It listens on loopback by default (`mqtt.listen = "127.0.0.1:1883"`). With
//! `mqtt.username` and `mqtt.password_file` set, every client (the daemon
//! included) must log in with them; on any other address without them it
//! warns, since then anyone on the network may publish requests.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest message the embedded broker carries (requests and returned PNGs).
pub const MAX_PAYLOAD: usize = 8 << 20;

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// `mqtt.listen`: both protocol levels.
    pub listen: SocketAddr,
    /// Loopback MQTT 5 listener the daemon connects to.
    pub v5: SocketAddr,
    front: tokio::task::JoinHandle<()>,
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // rumqttd's own threads have no stop switch; they end with the process.
        self.front.abort();
    }
}

/// The one login the embedded broker accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

/// The login from `[mqtt]`: `None` when `username` is empty; an error when a
/// username comes without a password file (a broker that lets anyone in
/// under a name would be a false promise).
pub fn credentials(mqtt: &crate::config::MqttConfig) -> Result<Option<Credentials>> {
    if mqtt.username.is_empty() {
        return Ok(None);
    }
    if mqtt.password_file.as_os_str().is_empty() {
        bail!("mqtt.username is set for the embedded broker, but mqtt.password_file is empty");
    }
    let password = crate::mqtt::client::read_password(&mqtt.password_file)?;
    if password.is_empty() {
        bail!(
            "mqtt.password_file {} is empty: the embedded broker needs a password",
            mqtt.password_file.display()
        );
    }
    Ok(Some(Credentials {
        username: mqtt.username.clone(),
        password,
    }))
}

/// Starts rumqttd and the front on `listen`; must run inside a tokio runtime.
/// With `login`, clients must authenticate with it.
pub async fn start(listen: &str, login: Option<Credentials>) -> Result<EmbeddedBroker> {
    let front = TcpListener::bind(listen)
        .await
        .with_context(|| format!("embedded broker: cannot listen on mqtt.listen = {listen}"))?;
    let listen = front
        .local_addr()
        .context("embedded broker: local address")?;
    if login.is_none() && !listen.ip().is_loopback() {
        log::warn!(
            "embedded broker listens on {listen} without a password: anyone who can reach it may \
             publish requests (set mqtt.username and mqtt.password_file)"
        );
    }
    let v4 = free_loopback_port()?;
    let v5 = free_loopback_port()?;
    let mut broker = rumqttd::Broker::new(config(v4, v5, login));
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(err) = broker.start() {
                log::error!("embedded broker stopped: {err}");
            }
        })
        .context("embedded broker: starting its thread")?;
    for addr in [v4, v5] {
        wait_until_listening(addr).await?;
    }
    let front = tokio::spawn(serve_front(front, v4, v5));
    log::info!("embedded MQTT broker listening on {listen}");
    Ok(EmbeddedBroker { listen, v5, front })
}

fn config(v4: SocketAddr, v5: SocketAddr, login: Option<Credentials>) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 100,
        // Also on the private loopback listeners, which local users could reach directly.
        auth: login.map(|c| HashMap::from([(c.username, c.password)])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: connections.clone(),
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            // Segments bound the broker's in-memory log per topic filter.
            max_segment_size: 2 * MAX_PAYLOAD,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server("v4", v4))])),
        v5: Some(HashMap::from([("1".to_string(), server("v5", v5))])),
        ..Config::default()
    }
}

/// A loopback port nobody listens on right now (the OS picks it).
fn free_loopback_port() -> Result<SocketAddr> {
    let probe = StdListener::bind("127.0.0.1:0")
        .context("embedded broker: finding a free loopback port")?;
    probe.local_addr().context("embedded broker: local address")
}

async fn wait_until_listening(addr: SocketAddr) -> Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("embedded broker did not start listening on {addr}")
}

async fn serve_front(listener: TcpListener, v4: SocketAddr, v5: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(async move {
                    if let Err(err) = splice(client, v4, v5).await {
                        log::debug!("embedded broker: connection from {peer}: {err:#}");
                    }
                });
            }
            Err(err) => {
                log::warn!("embedded broker: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Largest CONNECT packet the front reads (ids, will message, credentials).
const MAX_CONNECT: usize = 1 << 20;

/// Reads the CONNECT packet, picks the listener for its protocol level,
/// forwards the packet (with a client id when it had none), then copies both
/// ways until either side closes.
async fn splice(mut client: TcpStream, v4: SocketAddr, v5: SocketAddr) -> Result<()> {
    let mut head = Vec::with_capacity(128);
    let (level, length) = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let (Some(level), Some(length)) = (protocol_level(&head)?, packet_length(&head)?) {
                if head.len() >= length {
                    return Ok::<(u8, usize), anyhow::Error>((level, length));
                }
            }
            let mut chunk = [0u8; 1024];
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                bail!("closed before CONNECT");
            }
            head.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| anyhow!("no CONNECT within 10 s"))??;
    if let Some(rewritten) = with_client_id(&head[..length], level, &assigned_client_id())? {
        head.splice(..length, rewritten);
    }
    let target = if level == 5 { v5 } else { v4 };
    let mut upstream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    upstream.write_all(&head).await?;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// `edgegen-auto-<n>-<time>`: unique within this broker's life.
fn assigned_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000)
        .unwrap_or(0);
    format!(
        "edgegen-auto-{}-{nanos}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Remaining length (value, bytes used) at `at`, `None` when more bytes are needed.
fn varint(bytes: &[u8], at: usize) -> Result<Option<(usize, usize)>> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = bytes.get(at + i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    bail!("malformed variable-length integer")
}

fn encode_varint(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            b |= 0x80;
        }
        out.push(b);
        if value == 0 {
            break;
        }
    }
}

/// Length of the whole first packet, `None` when more bytes are needed.
fn packet_length(bytes: &[u8]) -> Result<Option<usize>> {
    let Some((remaining, used)) = varint(bytes, 1)? else {
        return Ok(None);
    };
    let length = 1 + used + remaining;
    if length > MAX_CONNECT {
        bail!("CONNECT packet of {length} bytes");
    }
    Ok(Some(length))
}

/// The CONNECT packet with `id` as client id when its own is empty, else `None`.
fn with_client_id(packet: &[u8], level: u8, id: &str) -> Result<Option<Vec<u8>>> {
    let truncated = || anyhow!("truncated CONNECT packet");
    let (_, used) = varint(packet, 1)?.ok_or_else(truncated)?;
    let mut at = 1 + used;
    let name_len = usize::from(u16::from_be_bytes([
        *packet.get(at).ok_or_else(truncated)?,
        *packet.get(at + 1).ok_or_else(truncated)?,
    ]));
    // Name, level, flags, keep-alive.
    at += 2 + name_len + 1 + 1 + 2;
    if level == 5 {
        let (properties, used) = varint(packet, at)?.ok_or_else(truncated)?;
        at += used + properties;
    }
    let id_len = packet.get(at..at + 2).ok_or_else(truncated)?;
    if id_len != [0, 0] {
        return Ok(None);
    }
    let body = &packet[1 + used..];
    let id_at = at - (1 + used);
    let mut rewritten = vec![packet[0]];
    let id_len = u16::try_from(id.len()).map_err(|_| anyhow!("client id too long"))?;
    encode_varint(body.len() + id.len(), &mut rewritten);
    rewritten.extend_from_slice(&body[..id_at]);
    rewritten.extend_from_slice(&id_len.to_be_bytes());
    rewritten.extend_from_slice(id.as_bytes());
    rewritten.extend_from_slice(&body[id_at + 2..]);
    Ok(Some(rewritten))
}

/// The protocol level of a CONNECT packet (4 = 3.1.1, 5 = MQTT 5), `None` when
/// more bytes are needed, an error when this is not an MQTT CONNECT.
fn protocol_level(bytes: &[u8]) -> Result<Option<u8>> {
    let Some(&first) = bytes.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        bail!("first packet is not CONNECT (0x{first:02x})");
    }
    // Remaining length: 1 to 4 bytes, 7 bits each, high bit = more.
    let mut at = 1;
    loop {
        let Some(&b) = bytes.get(at) else {
            return Ok(None);
        };
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            bail!("malformed remaining length");
        }
    }
    let (Some(&hi), Some(&lo)) = (bytes.get(at), bytes.get(at + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    if name_len > 6 {
        bail!("unexpected protocol name length {name_len}");
    }
    Ok(bytes.get(at + 2 + name_len).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_need_a_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut mqtt = crate::config::MqttConfig::default();
        assert_eq!(credentials(&mqtt).unwrap(), None);
        mqtt.username = "kiosk".into();
        assert!(credentials(&mqtt).is_err());
        mqtt.password_file = dir.path().join("password");
        std::fs::write(&mqtt.password_file, "\n").unwrap();
        assert!(credentials(&mqtt).is_err(), "empty password");
        std::fs::write(&mqtt.password_file, "s3cret\nignored\n").unwrap();
        let login = credentials(&mqtt).unwrap().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("kiosk", "s3cret")
        );
        assert!(!format!("{login:?}").contains("s3cret"));
    }

    #[test]
    fn loopback_by_default() {
        let listen: SocketAddr = crate::config::MqttConfig::default().listen.parse().unwrap();
        assert!(listen.ip().is_loopback());
    }

    #[test]
    fn protocol_levels() {
        // CONNECT, remaining length 16, "MQTT", level 4 / 5.
        let v311 = [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2];
        let v5 = [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 5, 2];
        assert_eq!(protocol_level(&v311).unwrap(), Some(4));
        assert_eq!(protocol_level(&v5).unwrap(), Some(5));
        assert_eq!(protocol_level(&v5[..6]).unwrap(), None);
        assert_eq!(protocol_level(&[]).unwrap(), None);
        // Two-byte remaining length.
        let long = [0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 5];
        assert_eq!(protocol_level(&long).unwrap(), Some(5));
        assert!(protocol_level(b"GET / HTTP/1.1").is_err());
    }

    /// A 3.1.1 CONNECT: "MQTT", level 4, clean session, keep-alive 60, client id `id`.
    fn connect_v4(id: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut packet = vec![0x10];
        encode_varint(body.len(), &mut packet);
        packet.extend(body);
        packet
    }

    #[test]
    fn empty_client_ids_get_one() {
        let packet = connect_v4("");
        assert_eq!(packet_length(&packet).unwrap(), Some(packet.len()));
        let rewritten = with_client_id(&packet, 4, "auto-1").unwrap().unwrap();
        assert_eq!(rewritten, connect_v4("auto-1"));
        assert_eq!(
            with_client_id(&connect_v4("mine"), 4, "auto-1").unwrap(),
            None
        );
        // MQTT 5: a properties block sits before the payload.
        let v5_empty = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 0,
        ];
        let rewritten = with_client_id(&v5_empty, 5, "a").unwrap().unwrap();
        assert_eq!(
            rewritten,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'a']
        );
        // A remaining length that grows past 127 takes a second byte.
        let long_id = "x".repeat(130);
        let rewritten = with_client_id(&connect_v4(""), 4, &long_id)
            .unwrap()
            .unwrap();
        assert_eq!(rewritten, connect_v4(&long_id));
    }
}
