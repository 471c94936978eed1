//! `GET /api/jobs/{id}/events`: a job's status and result as server-sent
//! events. The stream starts with the job's current state, follows it, and
//! closes after the result.

use std::convert::Infallible;
use std::path::Path;

use axum::extract::{Path as UrlPath, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use super::api::{check_job_id, unknown_job, ApiError};
use super::{gallery, AppState};
use crate::daemon::JobEvent;

/// The JSON of a status or result as over MQTT; a result also gets
/// `image_urls`, where the page can load its pictures.
pub(super) fn event_json(event: &JobEvent, output_dir: &Path) -> Value {
    let mut value = match serde_json::to_value(event) {
        Ok(value) => value,
        Err(err) => {
            log::error!("encoding an event of job {}: {err}", event.id());
            return json!({ "id": event.id() });
        }
    };
    if let (JobEvent::Result(result), Value::Object(map)) = (event, &mut value) {
        let urls: Vec<String> = result
            .images
            .iter()
            .filter_map(|image| gallery::url_of(output_dir, Path::new(&image.path)))
            .collect();
        if !urls.is_empty() {
            map.insert("image_urls".into(), json!(urls));
        }
    }
    value
}

pub(super) async fn follow(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    check_job_id(&id)?;
    // Subscribed before the lookup, so that nothing falls between the two.
    let events = state.gateway.subscribe();
    let first = state
        .gateway
        .lookup(&id)
        .await
        .ok_or_else(|| unknown_job(&id))?;
    let follower = Follower {
        id,
        first: Some(first),
        finished: false,
        events,
        state,
    };
    let stream = futures_util::stream::unfold(follower, Follower::next);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The state of one event stream.
struct Follower {
    id: String,
    /// The looked-up state, sent first.
    first: Option<JobEvent>,
    finished: bool,
    events: Receiver<JobEvent>,
    state: AppState,
}

impl Follower {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Follower)> {
        if self.finished {
            return None;
        }
        let event = match self.first.take() {
            Some(event) => event,
            None => self.next_of_job().await?,
        };
        self.finished = event.is_final();
        let name = if event.is_final() { "result" } else { "status" };
        let data = event_json(&event, &self.state.output_dir);
        let sse = match Event::default().event(name).json_data(&data) {
            Ok(sse) => sse,
            Err(err) => {
                log::error!("job {}: cannot send an event: {err}", self.id);
                return None;
            }
        };
        Some((Ok(sse), self))
    }

    /// The job's next event; `None` when the server stops or the daemon is gone.
    async fn next_of_job(&mut self) -> Option<JobEvent> {
        loop {
            let stopping = &mut self.state.stopping;
            let received = tokio::select! {
                biased;
                // Err: the server is gone, which also means stop.
                _ = async { let _ = stopping.wait_for(|stop| *stop).await; } => return None,
                received = self.events.recv() => received,
            };
            match received {
                Ok(event) if event.id() == self.id => return Some(event),
                Ok(_) => continue,
                // Missed some events (a slow client): the job's current state
                // stands in for them; step updates are not worth more.
                Err(RecvError::Lagged(missed)) => {
                    log::debug!("job {}: event stream lagged by {missed}", self.id);
                    return self.state.gateway.lookup(&self.id).await;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}
