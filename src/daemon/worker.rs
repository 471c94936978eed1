//! Generation off the async runtime: one dedicated thread runs one job at a
//! time through the same `generate::run_job` path as the CLI, and reports
//! progress over a channel. The MQTT side never waits for it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::mpsc::UnboundedSender;

use crate::bundle::{self, Bundle};
use crate::config::Config;
use crate::file_stamp::FileStamp;
use crate::generate::{run_job, JobSpec, Outcome};
use crate::mqtt::messages::{ErrorBody, ErrorCode};
use crate::pipeline::{Cancelled, Pipeline};
use crate::request::{Request, Settings};
use crate::retention;

/// Loaded pipelines shared by the request checks and the worker, so a model
/// is in memory once. At most `CAPACITY` stay loaded (least recently used
/// goes first); a pipeline still in use lives on until its job ends. A model
/// that failed to load is remembered with its files' sizes and times: the
/// next request gets the same error without parsing gigabytes again, until
/// a file of the bundle changes.
pub struct Models {
    config: Config,
    loaded: Mutex<Vec<(String, Arc<Pipeline>)>>,
    failed: Mutex<HashMap<String, Failure>>,
    loads: AtomicUsize,
}

struct Failure {
    files: Vec<FileStamp>,
    message: String,
}

const CAPACITY: usize = 2;

impl Models {
    pub fn new(config: Config) -> Self {
        Models {
            config,
            loaded: Mutex::new(Vec::new()),
            failed: Mutex::new(HashMap::new()),
            loads: AtomicUsize::new(0),
        }
    }

    /// The bundle of a model id in `models.dir` (ids only: requests never name paths).
    pub fn bundle(&self, id: &str) -> Result<Bundle> {
        bundle::resolve(&self.config.models.dir, id)
    }

    /// The loaded pipeline of a bundle, loading it on first use. Loads are
    /// serialized: two at once would only compete for memory and cores.
    pub fn get(&self, bundle: &Bundle) -> Result<Arc<Pipeline>> {
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| anyhow::anyhow!("model cache poisoned"))?;
        if let Some(at) = loaded.iter().position(|(id, _)| *id == bundle.id) {
            let entry = loaded.remove(at);
            let pipeline = entry.1.clone();
            loaded.push(entry);
            return Ok(pipeline);
        }
        let pipeline = Arc::new(self.load(bundle)?);
        if loaded.len() >= CAPACITY {
            loaded.remove(0);
        }
        loaded.push((bundle.id.clone(), pipeline.clone()));
        Ok(pipeline)
    }

    /// Loads a bundle, or repeats why it failed before if none of its files changed since.
    fn load(&self, bundle: &Bundle) -> Result<Pipeline> {
        let mut failed = self
            .failed
            .lock()
            .map_err(|_| anyhow::anyhow!("model failure cache poisoned"))?;
        let files = FileStamp::all_under(&bundle.dir);
        if let Some(failure) = failed.get(&bundle.id).filter(|f| f.files == files) {
            anyhow::bail!("{}", failure.message);
        }
        self.loads.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let pipeline = match crate::commands::load_pipeline(&self.config, bundle) {
            Ok(pipeline) => pipeline,
            Err(err) => {
                let message = format!("{err:#}");
                failed.insert(bundle.id.clone(), Failure { files, message });
                return Err(err);
            }
        };
        failed.remove(&bundle.id);
        log::info!(
            "loaded model '{}' in {:.1} s",
            bundle.id,
            started.elapsed().as_secs_f64()
        );
        Ok(pipeline)
    }
}

/// One job for the worker.
#[derive(Debug)]
pub struct WorkOrder {
    pub id: String,
    pub model: String,
    pub request: Request,
    pub png_path: PathBuf,
    pub cancel: Arc<AtomicBool>,
}

/// How a job ended.
#[derive(Debug)]
pub enum JobEnd {
    Done {
        outcome: Box<Outcome>,
        store_ms: f64,
    },
    Failed(ErrorBody),
    /// Cancelled on request.
    Cancelled,
    /// Stopped at a step boundary because the daemon is shutting down; the job stays spooled.
    Interrupted,
}

/// What the worker reports.
#[derive(Debug)]
pub enum WorkerEvent {
    Started { id: String, steps: u32 },
    Step { id: String, step: u32, steps: u32 },
    Finished { id: String, end: JobEnd },
}

/// Handle to the worker thread.
pub struct Worker {
    orders: Option<mpsc::Sender<WorkOrder>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread; it first loads `warm_model` (when not empty) so the
    /// first request does not pay for it.
    pub fn spawn(
        config: Config,
        models: Arc<Models>,
        events: UnboundedSender<WorkerEvent>,
        warm_model: String,
    ) -> Result<Worker> {
        let (orders, inbox) = mpsc::channel::<WorkOrder>();
        let stop = Arc::new(AtomicBool::new(false));
        let context = Runner {
            config,
            models,
            events,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("generate".into())
            .spawn(move || {
                context.warm(&warm_model);
                for order in inbox {
                    context.run(order);
                }
            })
            .context("starting the generation thread")?;
        Ok(Worker {
            orders: Some(orders),
            stop,
            thread: Some(thread),
        })
    }

    pub fn submit(&self, order: WorkOrder) -> Result<()> {
        self.orders
            .as_ref()
            .context("generation thread already stopped")?
            .send(order)
            .map_err(|_| anyhow::anyhow!("generation thread has stopped"))
    }

    /// Makes a running job stop at its next step (it is reported as `Interrupted`).
    pub fn interrupt(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Closes the order channel and waits for the thread to end.
    pub fn join(mut self) {
        self.orders.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("generation thread panicked");
            }
        }
    }
}

struct Runner {
    config: Config,
    models: Arc<Models>,
    events: UnboundedSender<WorkerEvent>,
    stop: Arc<AtomicBool>,
}

impl Runner {
    fn warm(&self, model: &str) {
        if model.is_empty() {
            return;
        }
        if let Err(err) = self.models.bundle(model).and_then(|b| self.models.get(&b)) {
            log::warn!("could not preload model '{model}': {err:#}");
        }
    }

    fn run(&self, order: WorkOrder) {
        let id = order.id.clone();
        // A panic inside a model must cost one job, not the daemon.
        let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.generate(&order)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                log::error!("job {id}: generation panicked: {what}");
                JobEnd::Failed(ErrorBody::new(
                    ErrorCode::Internal,
                    format!("generation panicked: {what}"),
                ))
            });
        if let JobEnd::Done { outcome, .. } = &end {
            self.apply_retention(outcome);
        }
        let _ = self.events.send(WorkerEvent::Finished { id, end });
    }

    fn generate(&self, order: &WorkOrder) -> JobEnd {
        let pipeline = match self
            .models
            .bundle(&order.model)
            .and_then(|b| self.models.get(&b))
        {
            Ok(p) => p,
            Err(err) => {
                return JobEnd::Failed(ErrorBody::new(ErrorCode::ModelError, format!("{err:#}")))
            }
        };
        let settings: Settings = match pipeline.resolve(&order.request, &self.config.limits) {
            Ok(s) => s,
            Err(err) => return JobEnd::Failed(ErrorBody::invalid_field(err.field, &err.message)),
        };
        let _ = self.events.send(WorkerEvent::Started {
            id: order.id.clone(),
            steps: settings.steps,
        });
        let mut hook = |step: usize, steps: usize| {
            if order.cancel.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
                return false;
            }
            if step > 0 {
                let _ = self.events.send(WorkerEvent::Step {
                    id: order.id.clone(),
                    step: step as u32,
                    steps: steps as u32,
                });
            }
            true
        };
        let spec = JobSpec {
            id: &order.id,
            model: &order.model,
            request: &order.request,
            settings: &settings,
            png_path: &order.png_path,
        };
        let started = Instant::now();
        match run_job(&pipeline, &spec, &mut hook) {
            Ok(outcome) => {
                let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                let store_ms =
                    ((elapsed_ms - outcome.timings.total_ms).max(0.0) * 1e3).round() / 1e3;
                JobEnd::Done {
                    outcome: Box::new(outcome),
                    store_ms,
                }
            }
            Err(err) if err.downcast_ref::<Cancelled>().is_some() => {
                if order.cancel.load(Ordering::SeqCst) {
                    JobEnd::Cancelled
                } else {
                    JobEnd::Interrupted
                }
            }
            Err(err) => JobEnd::Failed(classify(&err)),
        }
    }

    fn apply_retention(&self, outcome: &Outcome) {
        let policy = retention::Policy::from_config(&self.config.storage);
        let keep: Vec<PathBuf> = outcome
            .images
            .iter()
            .flat_map(|i| [i.path.clone(), i.sidecar.clone()])
            .collect();
        if let Err(err) = retention::enforce(
            &self.config.storage.output_dir,
            policy,
            &keep,
            SystemTime::now(),
        ) {
            log::warn!("retention: {err:#}");
        }
    }
}

/// Error code of a failed generation: a full disk, other file trouble, or the model.
fn classify(err: &anyhow::Error) -> ErrorBody {
    if crate::storage::is_storage_full(err) {
        return ErrorBody::new(ErrorCode::StorageFull, format!("{err:#}"));
    }
    let io_failure = err
        .chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some());
    let code = if io_failure {
        ErrorCode::Internal
    } else {
        ErrorCode::ModelError
    };
    ErrorBody::new(code, format!("{err:#}"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_broken_model_is_parsed_once_until_its_files_change() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles");
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle_dir = dir.path().join("gan");
        copy_tree(&fixtures.join("gan-class"), &bundle_dir);
        let generator = bundle_dir.join("generator/model.onnx");
        let good = std::fs::read(&generator).expect("generator");
        std::fs::write(&generator, &good[..good.len() / 2]).expect("truncate");
        let mut config = Config::default();
        config.models.dir = dir.path().to_path_buf();
        config.engine.cache_dir = "off".into();
        let models = Models::new(config);
        let bundle = models.bundle("gan").expect("manifest is fine");

        let first = format!("{:#}", models.get(&bundle).err().expect("broken"));
        let second = format!("{:#}", models.get(&bundle).err().expect("still broken"));
        assert_eq!(first, second);
        assert_eq!(models.loads.load(Ordering::Relaxed), 1, "parsed again");

        std::fs::write(&generator, &good).expect("repair");
        assert!(models.get(&bundle).is_ok(), "repaired model not loaded");
        assert_eq!(models.loads.load(Ordering::Relaxed), 2);
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
            let target = to.join(entry.file_name());
            if entry.path().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copy");
            }
        }
    }

    #[test]
    fn failures_map_to_error_codes() {
        let full =
            anyhow::Error::new(std::io::Error::from_raw_os_error(28)).context("writing x.png");
        assert_eq!(classify(&full).code, ErrorCode::StorageFull);
        let denied = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            .context("writing x.png");
        assert_eq!(classify(&denied).code, ErrorCode::Internal);
        let model = anyhow::anyhow!("unet: shape mismatch");
        assert_eq!(classify(&model).code, ErrorCode::ModelError);
        assert!(classify(&model).message.contains("shape mismatch"));
    }
}
