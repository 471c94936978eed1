//! Kiosk mode: a local web page and HTTP API in front of the daemon.
//!
//! Requests typed on the page go through `daemon::Gateway`, i.e. the same
//! intake, limits, spool and generation thread as MQTT requests; the page
//! follows its job over server-sent events and shows the stored pictures.
//! Every asset is compiled into the binary: a kiosk has no network.

mod api;
mod assets;
mod events;
pub mod gallery;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, Limits};
use crate::daemon::Gateway;
use crate::mqtt::messages::ModelsMessage;

/// How long `stop` waits for open responses before dropping them.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Computes the installed models list (the daemon's retained `models` message).
pub type ModelsSource = Arc<dyn Fn() -> ModelsMessage + Send + Sync>;

/// What the kiosk server needs from the daemon's configuration.
#[derive(Clone)]
pub struct KioskSettings {
    /// `host:port` to listen on (`kiosk.listen`).
    pub listen: String,
    /// Absolute `storage.output_dir`: pictures are served from here only.
    pub output_dir: PathBuf,
    pub limits: Limits,
    pub models: ModelsSource,
}

impl KioskSettings {
    pub fn from_config(config: &Config, models: ModelsSource) -> Self {
        KioskSettings {
            listen: config.kiosk.listen.clone(),
            output_dir: config.storage.output_dir.clone(),
            limits: config.limits.clone(),
            models,
        }
    }
}

/// Shared by every request handler.
#[derive(Clone)]
struct AppState {
    gateway: Gateway,
    output_dir: Arc<PathBuf>,
    limits: Arc<Limits>,
    models: ModelsSource,
    /// Turns true when the server stops, so that open event streams end.
    stopping: watch::Receiver<bool>,
}

/// The running kiosk server. Dropping it stops the server too, without
/// waiting.
pub struct Kiosk {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Binds `settings.listen` and serves on the current tokio runtime.
pub async fn start(settings: KioskSettings, gateway: Gateway) -> Result<Kiosk> {
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("kiosk.listen {}: cannot listen", settings.listen))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("kiosk.listen {}", settings.listen))?;
    let (stop, stopping) = watch::channel(false);
    let app = router(AppState {
        gateway,
        output_dir: Arc::new(settings.output_dir),
        limits: Arc::new(settings.limits),
        models: settings.models,
        stopping: stopping.clone(),
    });
    let mut shutdown = stopping;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // Err: the `Kiosk` was dropped, which also means stop.
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(err) = served {
            log::error!("kiosk server stopped: {err}");
        }
    });
    log::info!("kiosk page on http://{addr}/");
    Ok(Kiosk {
        addr,
        stop,
        task: Some(task),
    })
}

impl Kiosk {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops taking connections, ends open event streams and waits (briefly)
    /// for responses in progress.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let Some(mut task) = self.task.take() else {
            return;
        };
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            log::warn!("kiosk: responses still open after {STOP_GRACE:?}; closing them");
            task.abort();
        }
        log::info!("kiosk server stopped");
    }
}

impl Drop for Kiosk {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn router(state: AppState) -> Router {
    // Bodies over the limit are refused while being read; the handler answers
    // them with the same `too_large` error as MQTT gives.
    let body_limit = state.limits.max_payload_bytes;
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::asset))
        .route("/api/models", get(api::models))
        .route("/api/generate", post(api::generate))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/cancel", post(api::cancel))
        .route("/api/jobs/{id}/events", get(events::follow))
        .route("/api/images", get(api::images))
        .route("/images/{date}/{file}", get(api::image_file))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
