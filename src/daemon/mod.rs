//! `edgegen serve`: MQTT requests in, pictures out.
//!
//! One async task owns all job state (queue, running job, spool, outbox) and
//! reacts to three sources: the MQTT connection task, the generation thread
//! and timers. Generation runs on its own thread (`worker`), so the MQTT
//! event loop keeps acknowledging and pinging during a long UNet step.
//!
//! A request is parsed and checked against the limits and its model, written
//! to the spool, and only then acknowledged to the broker; a crash before the
//! ack means redelivery, a crash after it means the spool has the job.

mod announce;
pub mod intake;
mod jobs;
mod local;
mod outbox;
mod stored;
pub mod worker;

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::bundle;
use crate::config::Config;
use crate::mqtt::client::{self, Backoff, ClientEvent, ConnectSettings, Endpoint};
use crate::mqtt::home_assistant;
use crate::mqtt::messages::{
    ErrorBody, ErrorCode, ImageInfo, JobResult, JobState, Status, OFFLINE, ONLINE,
};
use crate::mqtt::topics::{self, Inbound, ReplyFilter, Topics};
use crate::request::Request;
use crate::retention;
use crate::spool::{Spool, Spooled};
use crate::storage;
use announce::{models_message, Stats};
use jobs::{
    delivery_key, from_hex, response_route, Job, ResponseRoute, Routes, Running, SpooledJob,
};
use outbox::Outbox;
use worker::{JobEnd, Models, WorkOrder, Worker, WorkerEvent};

pub use local::{Gateway, JobEvent};

/// How often the retained stats message is refreshed.
const STATS_EVERY: Duration = Duration::from_secs(30);
/// How often retention runs besides after every job (for `max_age_days`).
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Requests the MQTT client may hold before `try_publish` reports "full".
const CLIENT_CHANNEL: usize = 1024;
/// How long shutdown waits for queued results to reach the broker.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(3);
/// Fleet work is taken only while fewer jobs than this are unfinished here
/// (one running, one ready to start), so that a busy node leaves the group's
/// requests to idle ones.
const FLEET_UNFINISHED: usize = 2;
/// MQTT 5 Receive Maximum in fleet mode: fleet requests this node holds
/// unacknowledged count against it, so a broker that balances by in-flight
/// window (HiveMQ, EMQX) sends further work elsewhere.
const FLEET_RECEIVE_MAXIMUM: u16 = 4;
/// Failed and cancelled results kept in memory for `Gateway::lookup` (done
/// ones are found in storage).
const RECENT_RESULTS: usize = 64;

/// Runs the daemon until SIGTERM or SIGINT, then shuts down gracefully.
pub fn serve(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edgegen-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config, shutdown_signal()))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => log::info!("SIGINT: shutting down"),
        },
        Err(err) => {
            log::warn!("cannot watch SIGTERM ({err}); only SIGINT stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The daemon: serves until `shutdown` resolves, then stops taking requests,
/// lets the running job stop at its next step (it stays spooled), publishes
/// `offline` and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let config = with_absolute_dirs(config)?;
    let node = topics::node_id(&config.mqtt.node_id);
    let topics = Topics::new(&config.mqtt.prefix, &node)?;
    check_shared_group(&config.mqtt.shared_group)?;
    ReplyFilter::for_config(&config.mqtt).validate()?;
    let output_dir = &config.storage.output_dir;
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("creating {}", output_dir.display()))?;
    retention::sweep_temporaries(output_dir)?;
    let (spool, restored) = Spool::open::<SpooledJob>(&config.storage.state_dir.join("spool"))?;

    let (gateway, local) = local::channel();
    // Before any connection is made, so that a taken port stops the start
    // cleanly. Requests wait in the gateway until the daemon's loop runs.
    let kiosk = if config.kiosk.enabled {
        let models_config = config.clone();
        let source: crate::kiosk::ModelsSource = Arc::new(move || models_message(&models_config));
        let settings = crate::kiosk::KioskSettings::from_config(&config, source);
        Some(crate::kiosk::start(settings, gateway).await?)
    } else {
        None
    };

    let broker = match config.mqtt.broker.as_str() {
        "embedded" => {
            let login = crate::broker::credentials(&config.mqtt)?;
            Some(crate::broker::start(&config.mqtt.listen, login).await?)
        }
        _ => None,
    };
    let settings = connect_settings(&config, &topics, &node, broker.as_ref())?;
    log::info!(
        "node '{node}', client id '{}', broker {}",
        settings.client_id,
        settings.endpoint
    );
    let (client, mut mqtt_events, mqtt_task) =
        client::connect(&settings, CLIENT_CHANNEL, Backoff::default())?;

    let models = Arc::new(Models::new(config.clone()));
    let (worker_tx, mut worker_events) = unbounded_channel();
    let worker = Worker::spawn(
        config.clone(),
        models.clone(),
        worker_tx,
        config.models.default.clone(),
    )?;

    let local::GatewayEnd {
        commands: mut local_commands,
        events,
    } = local;

    let mut daemon = Daemon {
        config,
        topics,
        outbox: Outbox::new(client),
        spool,
        models,
        worker: Some(worker),
        queue: VecDeque::new(),
        running: None,
        stats: Stats::new(),
        stopping: false,
        events,
        recent: VecDeque::new(),
        held: VecDeque::new(),
    };
    daemon.restore(restored);
    let inputs = Inputs {
        mqtt: &mut mqtt_events,
        worker: &mut worker_events,
        local: &mut local_commands,
    };
    let served = daemon.serve(shutdown, inputs).await;
    // Local requests still waiting are answered "shutting down" (their reply
    // channels drop with the queue), so the kiosk has nothing left to wait for.
    drop(local_commands);
    if let Some(kiosk) = kiosk {
        kiosk.stop().await;
    }
    daemon
        .stop(&mut mqtt_events, &mut worker_events, mqtt_task)
        .await;
    drop(broker);
    // An error here makes the process exit non-zero, so a supervisor restarts it;
    // the spool still holds every unfinished job.
    served
}

fn with_absolute_dirs(mut config: Config) -> Result<Config> {
    let storage = &mut config.storage;
    storage.output_dir = std::path::absolute(&storage.output_dir)
        .with_context(|| format!("storage.output_dir {}", storage.output_dir.display()))?;
    storage.state_dir = std::path::absolute(&storage.state_dir)
        .with_context(|| format!("storage.state_dir {}", storage.state_dir.display()))?;
    Ok(config)
}

fn check_shared_group(group: &str) -> Result<()> {
    if group.contains(['/', '+', '#']) {
        bail!("mqtt.shared_group '{group}' must be one topic level (no '/', '+' or '#')");
    }
    Ok(())
}

fn connect_settings(
    config: &Config,
    topics: &Topics,
    node: &str,
    broker: Option<&crate::broker::EmbeddedBroker>,
) -> Result<ConnectSettings> {
    let client_id = match config.mqtt.client_id.as_str() {
        "" => format!("edgegen-{node}"),
        id => id.to_string(),
    };
    let mut settings = match broker {
        Some(b) => ConnectSettings::new(
            Endpoint {
                host: b.v5.ip().to_string(),
                port: b.v5.port(),
                tls: false,
            },
            client_id,
        )
        .with_credentials(&config.mqtt)?,
        None => ConnectSettings::new(client::parse_broker_url(&config.mqtt.broker)?, client_id)
            .with_credentials(&config.mqtt)?,
    };
    settings.persistent = true;
    settings.manual_acks = true;
    settings.relay_socket = Some(config.storage.state_dir.join("mqtt.sock"));
    if !config.mqtt.shared_group.is_empty() {
        settings.receive_maximum = Some(FLEET_RECEIVE_MAXIMUM);
    }
    settings.last_will = Some((topics.availability(), OFFLINE.as_bytes().to_vec()));
    // Room for requests somewhat over the limit, so they get a `too_large` answer
    // instead of being dropped by the broker.
    let limit = config
        .limits
        .max_payload_bytes
        .saturating_add(64 << 10)
        .max(1 << 20);
    settings.max_incoming_packet = u32::try_from(limit).unwrap_or(u32::MAX);
    Ok(settings)
}

struct Daemon {
    config: Config,
    topics: Topics,
    outbox: Outbox,
    spool: Spool,
    models: Arc<Models>,
    worker: Option<Worker>,
    queue: VecDeque<Job>,
    running: Option<Running>,
    stats: Stats,
    stopping: bool,
    events: tokio::sync::broadcast::Sender<JobEvent>,
    recent: VecDeque<JobResult>,
    /// Fleet requests received while busy, not yet acknowledged: the broker
    /// keeps them (and redelivers them after a crash) until this node takes them.
    held: VecDeque<Publish>,
}

/// A request turned away, and where its error result goes.
struct Rejection {
    routes: Routes,
    error: ErrorBody,
}

/// What the daemon's loop listens to besides timers.
struct Inputs<'a> {
    mqtt: &'a mut UnboundedReceiver<ClientEvent>,
    worker: &'a mut UnboundedReceiver<WorkerEvent>,
    local: &'a mut tokio::sync::mpsc::Receiver<local::Command>,
}

impl Daemon {
    /// Serves until `shutdown`; fails only if the generation thread is gone.
    async fn serve(
        &mut self,
        shutdown: impl Future<Output = ()>,
        inputs: Inputs<'_>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        let mut stats_tick = tokio::time::interval(STATS_EVERY);
        let mut retention_tick = tokio::time::interval(RETENTION_EVERY);
        // Retries handing queued messages to the client after it was full.
        let mut flush_tick = tokio::time::interval(Duration::from_millis(200));
        for tick in [&mut stats_tick, &mut retention_tick, &mut flush_tick] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                Some(event) = inputs.mqtt.recv() => self.on_client_event(event).await,
                Some(command) = inputs.local.recv() => self.on_local(command),
                event = inputs.worker.recv() => match event {
                    Some(event) => self.on_worker_event(event),
                    None => bail!("the generation thread stopped unexpectedly"),
                },
                _ = stats_tick.tick() => self.publish_stats(),
                _ = retention_tick.tick() => self.run_retention().await,
                _ = flush_tick.tick() => {}
            }
            self.take_held().await;
            self.dispatch_next();
            self.flush();
        }
    }

    async fn stop(
        mut self,
        mqtt_events: &mut UnboundedReceiver<ClientEvent>,
        worker_events: &mut UnboundedReceiver<WorkerEvent>,
        mqtt_task: tokio::task::JoinHandle<()>,
    ) {
        self.stopping = true;
        if let Some(worker) = &self.worker {
            worker.interrupt();
        }
        if let Some(running) = &self.running {
            log::info!(
                "waiting for job {} to reach a step boundary",
                running.job.id()
            );
        }
        let mut flush_tick = tokio::time::interval(Duration::from_millis(50));
        while self.running.is_some() {
            tokio::select! {
                event = worker_events.recv() => match event {
                    Some(event) => self.on_worker_event(event),
                    None => break,
                },
                Some(event) = mqtt_events.recv() => self.on_client_event(event).await,
                _ = flush_tick.tick() => {}
            }
            self.flush();
        }
        if let Some(worker) = self.worker.take() {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        let deadline = Instant::now() + DRAIN_ON_SHUTDOWN;
        while self.outbox.pending() > 0 && Instant::now() < deadline {
            tokio::select! {
                Some(event) = mqtt_events.recv() => self.on_client_event(event).await,
                _ = flush_tick.tick() => {}
            }
            self.flush();
        }
        if self.outbox.pending() > 0 {
            log::warn!(
                "{} messages could not be sent before shutdown",
                self.outbox.pending()
            );
        }
        if self.outbox.is_connected() {
            let client = self.outbox.client();
            // A clean DISCONNECT tells the broker not to publish the Last Will; say it ourselves.
            if let Err(err) =
                client.try_publish(self.topics.availability(), QoS::AtLeastOnce, true, OFFLINE)
            {
                log::warn!("could not publish offline: {err}");
            }
            let _ = client.try_disconnect();
            if tokio::time::timeout(Duration::from_secs(3), mqtt_task)
                .await
                .is_err()
            {
                log::warn!("MQTT connection did not close within 3 s");
            }
        }
        log::info!("stopped; {} jobs stay in the spool", self.queue.len());
    }

    fn restore(&mut self, restored: Vec<Spooled<SpooledJob>>) {
        for entry in restored {
            let id = entry.job.id.clone();
            if intake::check_id(&id).is_err() || self.position_of(&id).is_some() {
                log::warn!(
                    "spool file {} is invalid or a duplicate; removing it",
                    entry.path.display()
                );
                self.remove_spool_file(&entry.path);
                continue;
            }
            self.queue.push_back(Job {
                spooled: entry.job,
                path: entry.path,
                accepted: Instant::now(),
                intake_ms: None,
                also_reply: Vec::new(),
            });
        }
        if !self.queue.is_empty() {
            log::info!(
                "{} unfinished jobs from the spool re-queued",
                self.queue.len()
            );
        }
    }

    // ---- MQTT in ----

    async fn on_client_event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::Connected {
                session_present,
                max_packet,
            } => {
                log::info!("connected to MQTT broker (session present: {session_present})");
                self.on_connected(max_packet);
            }
            ClientEvent::Disconnected(_) => {
                self.outbox.set_connected(false, None);
                // The broker redelivers unacknowledged messages on the next connection.
                self.held.clear();
            }
            ClientEvent::Subscribed => {}
            ClientEvent::Publish(publish) => {
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                match self.topics.classify(&topic) {
                    Inbound::Request | Inbound::FleetRequest if self.stopping => {
                        // Not acknowledged: the broker keeps it for the next session.
                        return;
                    }
                    Inbound::FleetRequest if !self.takes_fleet_work() => {
                        log::debug!("busy: holding fleet request (message {})", publish.pkid);
                        self.held.push_back(publish);
                        return;
                    }
                    Inbound::Request | Inbound::FleetRequest => self.on_request(&publish),
                    Inbound::Cancel => self.on_cancel(&publish),
                    Inbound::Other if topic == home_assistant::STATUS_TOPIC => {
                        self.on_home_assistant_status(&publish)
                    }
                    Inbound::Other => log::debug!("ignoring message on {topic}"),
                }
                self.ack(&publish).await;
            }
        }
    }

    fn on_connected(&mut self, max_packet: Option<u32>) {
        self.outbox.set_connected(true, max_packet);
        // Subscriptions are renewed on every connection: a restarted broker may have lost them.
        self.outbox.subscribe(self.topics.request());
        self.outbox.subscribe(self.topics.cancel());
        if !self.config.mqtt.shared_group.is_empty() {
            self.outbox
                .subscribe(self.topics.shared_request(&self.config.mqtt.shared_group));
        }
        self.outbox.reliable(
            &self.topics.availability(),
            ONLINE.as_bytes().to_vec(),
            true,
            None,
            None,
        );
        match serde_json::to_vec(&models_message(&self.config)) {
            Ok(payload) => self
                .outbox
                .reliable(&self.topics.models(), payload, true, None, None),
            Err(err) => log::error!("encoding the models message: {err}"),
        }
        if self.config.mqtt.home_assistant {
            self.outbox
                .subscribe(home_assistant::STATUS_TOPIC.to_string());
            self.publish_discovery();
        }
        self.publish_stats();
    }

    fn takes_fleet_work(&self) -> bool {
        self.unfinished() < FLEET_UNFINISHED
    }

    /// Takes held fleet requests as far as this node has become free.
    async fn take_held(&mut self) {
        while !self.stopping && self.takes_fleet_work() {
            let Some(publish) = self.held.pop_front() else {
                return;
            };
            self.on_request(&publish);
            self.ack(&publish).await;
        }
    }

    fn on_home_assistant_status(&mut self, publish: &Publish) {
        if self.config.mqtt.home_assistant
            && publish.payload.as_ref() == home_assistant::BIRTH.as_bytes()
        {
            log::info!("Home Assistant came online; publishing discovery again");
            self.publish_discovery();
        }
    }

    fn publish_discovery(&mut self) {
        let max_prompt_chars = self.config.limits.max_prompt_chars;
        for message in home_assistant::discovery(&self.topics, max_prompt_chars) {
            match serde_json::to_vec(&message.payload) {
                Ok(payload) => self
                    .outbox
                    .reliable(&message.topic, payload, true, None, None),
                Err(err) => log::error!("encoding {}: {err}", message.topic),
            }
        }
    }

    async fn ack(&self, publish: &Publish) {
        match tokio::time::timeout(Duration::from_secs(1), self.outbox.client().ack(publish)).await
        {
            Ok(Ok(())) => {}
            Ok(Err(err)) => log::warn!("could not acknowledge message {}: {err}", publish.pkid),
            Err(_) => log::warn!(
                "acknowledging message {} timed out; the broker will redeliver it",
                publish.pkid
            ),
        }
    }

    fn on_request(&mut self, publish: &Publish) {
        let received = Instant::now();
        let replies = ReplyFilter::for_config(&self.config.mqtt);
        let (response, refused_response) = match response_route(publish, &replies) {
            Ok(response) => (response, None),
            Err(error) => (None, Some(error)),
        };
        let delivery = delivery_key(publish);
        if publish.dup && self.has_delivery(&delivery) {
            log::info!(
                "redelivered request (message {}) is already spooled",
                publish.pkid
            );
            return;
        }
        let intake = intake::parse(&publish.payload, &self.config.limits, &replies);
        let request = match refused_response {
            Some(error) => Err(error),
            None => intake.request,
        };
        let admitted = match request {
            Ok(request) => self.admit(request, response, Some(delivery), received),
            Err(error) => Err(Box::new(Rejection {
                routes: Routes {
                    id: intake.id.unwrap_or_else(intake::new_id),
                    reply_to: intake.reply_to,
                    response,
                },
                error,
            })),
        };
        if let Err(rejection) = admitted {
            self.reject(&rejection.routes, rejection.error);
        }
    }

    /// A request from a local front end: the same checks as over MQTT, but a
    /// rejection goes back to the caller only.
    fn on_local(&mut self, command: local::Command) {
        match command {
            local::Command::Submit { payload, answer } => {
                let received = Instant::now();
                let replies = ReplyFilter::for_config(&self.config.mqtt);
                let admitted = intake::parse(&payload, &self.config.limits, &replies)
                    .request
                    .and_then(|request| {
                        self.admit(request, None, None, received)
                            .map_err(|rejection| rejection.error)
                    });
                if let Err(error) = &admitted {
                    log::info!("local request rejected: {}: {}", error.code, error.message);
                    self.stats.rejected += 1;
                }
                let _ = answer.send(admitted);
            }
            local::Command::Lookup { id, answer } => {
                let _ = answer.send(self.lookup(&id));
            }
            local::Command::Cancel { id } => self.cancel(&id),
        }
    }

    /// Queues a request (or answers it from an unfinished or stored job of
    /// the same id); returns its id.
    fn admit(
        &mut self,
        mut request: Request,
        response: Option<ResponseRoute>,
        delivery: Option<String>,
        received: Instant,
    ) -> Result<String, Box<Rejection>> {
        let id = request.id.clone().unwrap_or_else(intake::new_id);
        request.id = Some(id.clone());
        let routes = Routes {
            id: id.clone(),
            reply_to: request.reply_to.clone(),
            response,
        };
        if let Some(status) = self.unfinished_status(&id) {
            log::info!("request {id} is already queued; its result answers this one too");
            self.publish_status(status, true);
            if routes.reply_to.is_some() || routes.response.is_some() {
                if let Some(job) = self.job_mut(&id) {
                    job.also_reply.push(routes);
                }
            }
            return Ok(id);
        }
        match stored::find(&self.config.storage.output_dir, &id) {
            Ok(Some(result)) => {
                log::info!("request {id} already has a stored result; answering from storage");
                self.answer_from_storage(&routes, result, request.return_image, None);
                return Ok(id);
            }
            Ok(None) => {}
            Err(err) => log::warn!("looking up a stored result for {id}: {err:#}"),
        }
        let unfinished = self.unfinished();
        if unfinished >= self.config.limits.queue {
            let message = format!(
                "{unfinished} jobs are waiting, at most {} allowed",
                self.config.limits.queue
            );
            let error = ErrorBody::new(ErrorCode::Busy, message);
            return Err(Box::new(Rejection { routes, error }));
        }
        let (model, steps) = match blocking(|| self.check_model(&request)) {
            Ok(checked) => checked,
            Err(error) => return Err(Box::new(Rejection { routes, error })),
        };
        let spooled = SpooledJob {
            id: id.clone(),
            model,
            request,
            received: chrono::Local::now().to_rfc3339(),
            steps,
            response: routes.response.clone(),
            delivery,
        };
        let path = match blocking(|| self.spool.add(&id, &spooled)) {
            Ok(path) => path,
            Err(err) => {
                let code = if storage::is_storage_full(&err) {
                    ErrorCode::StorageFull
                } else {
                    ErrorCode::Internal
                };
                let error = ErrorBody::new(code, format!("{err:#}"));
                return Err(Box::new(Rejection { routes, error }));
            }
        };
        self.queue.push_back(Job {
            spooled,
            path,
            accepted: Instant::now(),
            intake_ms: Some(millis(received.elapsed())),
            also_reply: Vec::new(),
        });
        let position = self.queue.len() - 1 + usize::from(self.running.is_some());
        log::info!("job {id} queued at position {position}");
        self.status(&id, JobState::Queued, 0, steps, position, true);
        Ok(id)
    }

    /// Checks the request against its model: returns the model id and the step count.
    fn check_model(&self, request: &Request) -> Result<(String, u32), ErrorBody> {
        let default = &self.config.models.default;
        let name = match request.model.as_deref().filter(|m| !m.is_empty()) {
            Some(name) => name,
            None if !default.is_empty() => default.as_str(),
            None => {
                return Err(ErrorBody::invalid_field(
                    "model",
                    "no model given and no default model is configured",
                ))
            }
        };
        if !bundle::is_valid_id(name) {
            return Err(ErrorBody::invalid_field(
                "model",
                format!("'{name}' is not a model id"),
            ));
        }
        let bundle = self.models.bundle(name).map_err(|err| {
            let code = if self.config.models.dir.join(name).is_dir() {
                ErrorCode::ModelError
            } else {
                ErrorCode::UnknownModel
            };
            ErrorBody {
                code,
                message: format!("{err:#}"),
                field: Some("model".into()),
            }
        })?;
        let pipeline = self
            .models
            .get(&bundle)
            .map_err(|err| ErrorBody::new(ErrorCode::ModelError, format!("{err:#}")))?;
        let settings = pipeline
            .resolve(request, &self.config.limits)
            .map_err(|err| ErrorBody::invalid_field(err.field, &err.message))?;
        Ok((bundle.id, settings.steps))
    }

    fn reject(&mut self, routes: &Routes, error: ErrorBody) {
        log::info!(
            "request {} rejected: {}: {}",
            routes.id,
            error.code,
            error.message
        );
        self.stats.rejected += 1;
        self.publish_result(routes, &JobResult::failed(&routes.id, error), None);
    }

    fn on_cancel(&mut self, publish: &Publish) {
        match intake::parse_cancel(&publish.payload) {
            Ok(id) => self.cancel(&id),
            Err(reason) => log::warn!("ignoring cancel message: {reason}"),
        }
    }

    fn cancel(&mut self, id: &str) {
        if let Some(at) = self.queue.iter().position(|j| j.id() == id) {
            if let Some(job) = self.queue.remove(at) {
                log::info!("job {id} cancelled while queued");
                self.end_job(job, JobEnd::Cancelled, None);
            }
        } else if let Some(running) = self.running.as_ref().filter(|r| r.job.id() == id) {
            log::info!("job {id} cancelled while running; it stops at the next step");
            running.cancel.store(true, Ordering::SeqCst);
        } else {
            log::info!("cancel for {id}: no such queued or running job");
        }
    }

    // ---- generation ----

    fn dispatch_next(&mut self) {
        while self.running.is_none() && !self.stopping {
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            // A job restored after a crash may have been stored just before it.
            match stored::find(&self.config.storage.output_dir, job.id()) {
                Ok(Some(result)) => {
                    let path = job.path.clone();
                    self.answer_from_storage(
                        &job.routes(),
                        result,
                        job.spooled.request.return_image,
                        Some(path),
                    );
                    continue;
                }
                Ok(None) => {}
                Err(err) => log::warn!("looking up a stored result for {}: {err:#}", job.id()),
            }
            let cancel = Arc::new(AtomicBool::new(false));
            let order = WorkOrder {
                id: job.spooled.id.clone(),
                model: job.spooled.model.clone(),
                request: job.spooled.request.clone(),
                png_path: storage::dated_png_path(&self.config.storage.output_dir, job.id()),
                cancel: cancel.clone(),
            };
            let submitted = match &self.worker {
                Some(worker) => worker.submit(order),
                None => Err(anyhow::anyhow!("generation thread is gone")),
            };
            if let Err(err) = submitted {
                log::error!("job {}: {err:#}", job.id());
                self.end_job(
                    job,
                    JobEnd::Failed(ErrorBody::new(ErrorCode::Internal, format!("{err:#}"))),
                    None,
                );
                continue;
            }
            let steps = job.spooled.steps;
            self.running = Some(Running {
                job,
                cancel,
                started: Instant::now(),
                step: 0,
                steps,
            });
        }
    }

    fn on_worker_event(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::Started { id, steps } => {
                if let Some(running) = self.running.as_mut().filter(|r| r.job.id() == id) {
                    running.steps = steps;
                }
                log::info!("job {id} running ({steps} steps)");
                self.status(&id, JobState::Running, 0, steps, 0, true);
            }
            WorkerEvent::Step { id, step, steps } => {
                if let Some(running) = self.running.as_mut().filter(|r| r.job.id() == id) {
                    running.step = step;
                }
                self.status(&id, JobState::Running, step, steps, 0, false);
            }
            WorkerEvent::Finished { id, end } => {
                let Some(running) = self.running.take() else {
                    return log::error!("job {id} finished but none was running");
                };
                if running.job.id() != id {
                    log::error!("job {id} finished but {} was running", running.job.id());
                }
                if matches!(end, JobEnd::Interrupted) {
                    // Unfinished and still spooled: it runs again after a restart (or
                    // at once, should anything but shutdown have interrupted it).
                    log::info!("job {id} interrupted; it stays in the spool");
                    self.queue.push_front(running.job);
                    return;
                }
                let queue_ms = millis(running.started.duration_since(running.job.accepted));
                self.end_job(running.job, end, Some(queue_ms));
            }
        }
    }

    /// Publishes the end of a job and removes its spool file once the result is out.
    fn end_job(&mut self, job: Job, end: JobEnd, queue_ms: Option<f64>) {
        let id = job.id().to_string();
        let routes = job.routes();
        let steps = job.spooled.steps;
        let result = match end {
            JobEnd::Done { outcome, store_ms } => {
                let mut result = stored::from_outcome(&outcome, queue_ms.unwrap_or(0.0), store_ms);
                if let Some(timings) = result.timings.as_mut() {
                    timings.intake_ms = job.intake_ms;
                }
                self.stats.record_done(
                    &outcome.model,
                    outcome.images.len(),
                    outcome.timings.total_ms,
                );
                log::info!("job {id} done: {}", result.path.as_deref().unwrap_or("-"));
                if job.spooled.request.return_image {
                    self.publish_images(&id, &result.images);
                }
                if let Some(first) = result
                    .images
                    .first()
                    .filter(|_| self.config.mqtt.home_assistant)
                {
                    let topic = self.topics.latest_image();
                    self.publish_file(&topic, &first.path, true);
                }
                let steps = result.steps.unwrap_or(steps);
                self.status(&id, JobState::Done, steps, steps, 0, true);
                result
            }
            JobEnd::Failed(error) => {
                log::warn!("job {id} failed: {}: {}", error.code, error.message);
                self.stats.failed += 1;
                self.status(&id, JobState::Failed, 0, steps, 0, true);
                JobResult::failed(&id, error)
            }
            JobEnd::Cancelled => {
                self.stats.cancelled += 1;
                self.status(&id, JobState::Cancelled, 0, steps, 0, true);
                JobResult::failed(
                    &id,
                    ErrorBody::new(ErrorCode::Cancelled, "cancelled on request"),
                )
            }
            JobEnd::Interrupted => {
                log::info!("job {id} interrupted by shutdown; it stays in the spool");
                return;
            }
        };
        for extra in &job.also_reply {
            // The job's own topic gets the result once, below.
            self.send_result(extra, &result, None, false);
        }
        self.publish_result(&routes, &result, Some(job.path));
        self.publish_stats();
    }

    fn answer_from_storage(
        &mut self,
        routes: &Routes,
        result: JobResult,
        return_image: bool,
        spool_file: Option<PathBuf>,
    ) {
        if return_image {
            self.publish_images(&routes.id, &result.images);
        }
        self.publish_result(routes, &result, spool_file);
    }

    // ---- MQTT out ----

    fn status(
        &mut self,
        id: &str,
        state: JobState,
        step: u32,
        steps: u32,
        queue_position: usize,
        reliable: bool,
    ) {
        let status = Status {
            id: id.to_string(),
            state,
            step,
            steps,
            queue_position,
        };
        self.publish_status(status, reliable);
    }

    fn publish_status(&mut self, status: Status, reliable: bool) {
        let Ok(payload) = serde_json::to_vec(&status) else {
            return;
        };
        let topic = self.topics.job_status(&status.id);
        if reliable {
            self.outbox.reliable(&topic, payload, false, None, None);
        } else {
            self.outbox.lossy(&topic, payload, QoS::AtLeastOnce, false);
        }
        let _ = self.events.send(JobEvent::Status(status));
    }

    /// The result goes to the job's topic, to `reply_to`, and to the MQTT 5
    /// response topic with the request's correlation data.
    fn publish_result(&mut self, routes: &Routes, result: &JobResult, spool_file: Option<PathBuf>) {
        self.send_result(routes, result, spool_file, true);
        if result.error.is_some() {
            if self.recent.len() == RECENT_RESULTS {
                self.recent.pop_front();
            }
            self.recent.push_back(result.clone());
        }
        let _ = self.events.send(JobEvent::Result(Box::new(result.clone())));
    }

    fn send_result(
        &mut self,
        routes: &Routes,
        result: &JobResult,
        spool_file: Option<PathBuf>,
        job_topic: bool,
    ) {
        let payload = match serde_json::to_vec(result) {
            Ok(payload) => payload,
            Err(err) => return log::error!("encoding the result of {}: {err}", routes.id),
        };
        let mut targets = Vec::new();
        if job_topic {
            targets.push((self.topics.job_result(&routes.id), None));
        }
        if let Some(reply_to) = &routes.reply_to {
            targets.push((reply_to.clone(), None));
        }
        if let Some(response) = &routes.response {
            let properties = PublishProperties {
                correlation_data: response
                    .correlation_hex
                    .as_deref()
                    .and_then(from_hex)
                    .map(Into::into),
                ..PublishProperties::default()
            };
            targets.push((response.topic.clone(), Some(properties)));
        }
        let Some(last) = targets.len().checked_sub(1) else {
            return;
        };
        let mut spool_file = spool_file;
        for (index, (topic, properties)) in targets.into_iter().enumerate() {
            let then_remove = if index == last {
                spool_file.take()
            } else {
                None
            };
            self.outbox
                .reliable(&topic, payload.clone(), false, properties, then_remove);
        }
    }

    fn publish_images(&mut self, id: &str, images: &[ImageInfo]) {
        for (index, image) in images.iter().enumerate() {
            let topic = self.topics.job_image(id, index);
            self.publish_file(&topic, &image.path, false);
        }
    }

    fn publish_file(&mut self, topic: &str, path: &str, retain: bool) {
        match std::fs::read(path) {
            Ok(png) if self.outbox.fits(topic, png.len()) => {
                self.outbox.reliable(topic, png, retain, None, None)
            }
            Ok(png) => log::warn!(
                "{path}: {} bytes exceed the broker's packet limit; not sent",
                png.len()
            ),
            Err(err) => log::warn!("cannot read {path} to publish it: {err}"),
        }
    }

    fn publish_stats(&mut self) {
        let unfinished = self.unfinished();
        let running = self.running.as_ref().map(|r| r.job.id().to_string());
        let stats = self.stats.message(unfinished, running);
        if let Ok(payload) = serde_json::to_vec(&stats) {
            self.outbox
                .lossy(&self.topics.stats(), payload, QoS::AtMostOnce, true);
        }
    }

    fn flush(&mut self) {
        for path in self.outbox.flush() {
            self.remove_spool_file(&path);
        }
    }

    // ---- helpers ----

    fn remove_spool_file(&self, path: &Path) {
        if let Err(err) = blocking(|| self.spool.remove(path)) {
            log::error!("{err:#}");
        }
    }

    /// Accepted jobs not finished yet, the running one included.
    fn unfinished(&self) -> usize {
        self.queue.len() + usize::from(self.running.is_some())
    }

    /// The status of a queued or running job.
    fn unfinished_status(&self, id: &str) -> Option<Status> {
        let queue_position = self.position_of(id)?;
        let (state, step, steps) = match &self.running {
            Some(r) if r.job.id() == id => (JobState::Running, r.step, r.steps),
            _ => {
                let steps = self
                    .queue
                    .iter()
                    .find(|j| j.id() == id)
                    .map_or(0, |j| j.spooled.steps);
                (JobState::Queued, 0, steps)
            }
        };
        Some(Status {
            id: id.to_string(),
            state,
            step,
            steps,
            queue_position,
        })
    }

    /// A job's status while unfinished, else its result: recent failures
    /// from memory, pictures from storage.
    fn lookup(&self, id: &str) -> Option<JobEvent> {
        intake::check_id(id).ok()?;
        if let Some(status) = self.unfinished_status(id) {
            return Some(JobEvent::Status(status));
        }
        if let Some(result) = self.recent.iter().rev().find(|r| r.id == id) {
            return Some(JobEvent::Result(Box::new(result.clone())));
        }
        match blocking(|| stored::find(&self.config.storage.output_dir, id)) {
            Ok(found) => found.map(|result| JobEvent::Result(Box::new(result))),
            Err(err) => {
                log::warn!("looking up a stored result for {id}: {err:#}");
                None
            }
        }
    }

    /// 0 for the running job, 1… for queued ones, `None` when unknown.
    fn position_of(&self, id: &str) -> Option<usize> {
        let running = self.running.as_ref().is_some_and(|r| r.job.id() == id);
        if running {
            return Some(0);
        }
        let offset = usize::from(self.running.is_some());
        self.queue
            .iter()
            .position(|j| j.id() == id)
            .map(|at| at + offset)
    }

    fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
        match &mut self.running {
            Some(running) if running.job.id() == id => Some(&mut running.job),
            _ => self.queue.iter_mut().find(|j| j.id() == id),
        }
    }

    fn has_delivery(&self, key: &str) -> bool {
        let matches = |job: &Job| job.spooled.delivery.as_deref() == Some(key);
        self.queue.iter().any(matches) || self.running.as_ref().is_some_and(|r| matches(&r.job))
    }

    async fn run_retention(&self) {
        let output_dir = self.config.storage.output_dir.clone();
        let policy = retention::Policy::from_config(&self.config.storage);
        if policy.is_unlimited() {
            return;
        }
        let done = tokio::task::spawn_blocking(move || {
            retention::enforce(&output_dir, policy, &[], SystemTime::now())
        })
        .await;
        match done {
            Ok(Err(err)) => log::warn!("retention: {err:#}"),
            Err(err) => log::warn!("retention task: {err}"),
            Ok(Ok(_)) => {}
        }
    }
}

/// Runs short blocking file work (fsync, model checks) without stalling the
/// other tasks of a multi-threaded runtime.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
