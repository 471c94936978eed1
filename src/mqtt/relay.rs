//! A byte relay between the MQTT client and the broker, so the daemon's TCP
//! connection has `TCP_NODELAY` set.
//!
//! rumqttc 0.24 offers no way to set `TCP_NODELAY`. Without it, a small write
//! that follows one the broker does not answer (our PUBACK of a request) waits
//! for the broker's delayed TCP acknowledgement: up to 40 ms on Linux, added to
//! every request. So the client talks to a Unix socket (no Nagle there) and
//! this relay copies each connection to a fresh TCP connection with
//! `TCP_NODELAY`. One relayed connection per client connection: when either
//! side closes, so does the other, and the client's reconnection logic applies
//! unchanged. Plain TCP only; `mqtts://` connections go direct.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A running relay; the socket file goes when it is dropped.
pub struct Relay {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on `path` and relays every connection to `target` (`host:port`).
    /// Must run inside a tokio runtime.
    pub fn start(path: &Path, target: String) -> Result<Relay> {
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                path.display()
            );
        }
        // A socket file left by a previous run (after kill -9) would make bind fail.
        match std::fs::remove_file(path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(err).with_context(|| format!("removing old socket {}", path.display()));
            }
            _ => {}
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        let task = tokio::spawn(serve(listener, target));
        Ok(Relay {
            path: path.to_path_buf(),
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(listener: UnixListener, target: String) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let target = target.clone();
                tokio::spawn(async move {
                    if let Err(err) = relay(client, &target).await {
                        log::debug!("MQTT relay to {target}: {err:#}");
                    }
                });
            }
            Err(err) => {
                log::warn!("MQTT relay: accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Copies both ways until either side closes; a broker that cannot be reached
/// closes the client's side at once, which it sees as a failed connection.
async fn relay(mut client: UnixStream, target: &str) -> Result<()> {
    let mut broker = match TcpStream::connect(target).await {
        Ok(broker) => broker,
        Err(err) => {
            // The client only sees its side close; this line says why.
            log::warn!("cannot reach the MQTT broker at {target}: {err}");
            return Ok(());
        }
    };
    broker.set_nodelay(true).context("setting TCP_NODELAY")?;
    tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_pass_both_ways_and_closing_propagates() {
        let dir = tempfile::tempdir().unwrap();
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(&buf).await.unwrap();
            // Then close: the client must see end of stream.
        });
        let relay = Relay::start(&dir.path().join("r.sock"), target).unwrap();
        let mut client = UnixStream::connect(relay.path()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
    }

    #[tokio::test]
    async fn unreachable_broker_closes_the_client_side() {
        let dir = tempfile::tempdir().unwrap();
        // A port nobody listens on: bind, note, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let relay = Relay::start(&dir.path().join("r.sock"), format!("127.0.0.1:{port}")).unwrap();
        let mut client = UnixStream::connect(relay.path()).await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back.is_empty());
    }

    #[test]
    fn overlong_paths_are_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(Relay::start(&long, "127.0.0.1:1".into()).is_err());
    }
}
