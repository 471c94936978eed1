//! Requests that arrive other than over MQTT (the kiosk's HTTP API). They go
//! through the same intake, limits, spool and generation thread as MQTT
//! requests; the answer to a submission comes back on a channel, and every
//! job's progress is broadcast to whoever listens.

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::mqtt::messages::{ErrorBody, ErrorCode, JobResult, Status};

/// Commands a local front end may send while the daemon is too busy to listen
/// at once; beyond this, `submit` waits (the front end sees backpressure).
const COMMANDS: usize = 64;
/// Events a slow listener may lag behind before it misses some.
const EVENTS: usize = 256;

/// Progress of a job, as published on its MQTT status and result topics.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum JobEvent {
    Status(Status),
    Result(Box<JobResult>),
}

impl JobEvent {
    pub fn id(&self) -> &str {
        match self {
            JobEvent::Status(status) => &status.id,
            JobEvent::Result(result) => &result.id,
        }
    }

    /// True for the last event of a job.
    pub fn is_final(&self) -> bool {
        matches!(self, JobEvent::Result(_))
    }
}

pub(super) enum Command {
    Submit {
        payload: Vec<u8>,
        answer: oneshot::Sender<Result<String, ErrorBody>>,
    },
    Lookup {
        id: String,
        answer: oneshot::Sender<Option<JobEvent>>,
    },
    Cancel {
        id: String,
    },
}

/// A front end's handle on the running daemon. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<JobEvent>,
}

pub(super) struct GatewayEnd {
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) events: broadcast::Sender<JobEvent>,
}

pub(super) fn channel() -> (Gateway, GatewayEnd) {
    let (commands_tx, commands) = mpsc::channel(COMMANDS);
    let (events, _) = broadcast::channel(EVENTS);
    let gateway = Gateway {
        commands: commands_tx,
        events: events.clone(),
    };
    (gateway, GatewayEnd { commands, events })
}

impl Gateway {
    /// Takes a request (the JSON of an MQTT request, or a bare prompt): its id
    /// once it is queued, or the error an MQTT client would get as its result.
    pub async fn submit(&self, payload: Vec<u8>) -> Result<String, ErrorBody> {
        let (answer, answered) = oneshot::channel();
        self.send(Command::Submit { payload, answer }).await?;
        answered.await.map_err(|_| stopping())?
    }

    /// The job's latest status while unfinished, its result once finished
    /// (for recent jobs and every stored picture), `None` when unknown.
    pub async fn lookup(&self, id: &str) -> Option<JobEvent> {
        let (answer, answered) = oneshot::channel();
        let id = id.to_string();
        self.send(Command::Lookup { id, answer }).await.ok()?;
        answered.await.ok().flatten()
    }

    pub async fn cancel(&self, id: &str) -> Result<(), ErrorBody> {
        let id = id.to_string();
        self.send(Command::Cancel { id }).await
    }

    /// Every job's status and result events from now on. Subscribe before
    /// `lookup` so that nothing falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    async fn send(&self, command: Command) -> Result<(), ErrorBody> {
        self.commands.send(command).await.map_err(|_| stopping())
    }
}

fn stopping() -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, "the daemon is shutting down")
}
