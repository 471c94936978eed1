//! What the daemon announces about itself: the retained `models` list and
//! the counters behind the `stats` message.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::bundle;
use crate::config::Config;
use crate::mqtt::messages::{ModelDefaults, ModelInfo, ModelStats, ModelsMessage, StatsMessage};

pub(super) struct Stats {
    pub(super) started: Instant,
    pub(super) done: u64,
    pub(super) failed: u64,
    pub(super) cancelled: u64,
    pub(super) rejected: u64,
    /// Per model: pictures and total generation milliseconds.
    pub(super) per_model: BTreeMap<String, (u64, f64)>,
    pub(super) last_ms: Option<f64>,
}

impl Stats {
    pub(super) fn new() -> Self {
        Stats {
            started: Instant::now(),
            done: 0,
            failed: 0,
            cancelled: 0,
            rejected: 0,
            per_model: BTreeMap::new(),
            last_ms: None,
        }
    }

    pub(super) fn record_done(&mut self, model: &str, pictures: usize, generation_ms: f64) {
        self.done += 1;
        let entry = self.per_model.entry(model.to_string()).or_default();
        entry.0 += pictures as u64;
        entry.1 += generation_ms;
        self.last_ms = Some(generation_ms);
    }

    /// The stats message for `unfinished` jobs, `running` the one in progress.
    pub(super) fn message(&self, unfinished: usize, running: Option<String>) -> StatsMessage {
        StatsMessage {
            queue: unfinished,
            running,
            done: self.done,
            failed: self.failed,
            cancelled: self.cancelled,
            rejected: self.rejected,
            models: self
                .per_model
                .iter()
                .map(|(model, &(images, total_ms))| {
                    let mean_ms = if images > 0 {
                        total_ms / images as f64
                    } else {
                        0.0
                    };
                    let stats = ModelStats {
                        images,
                        mean_ms: (mean_ms * 1e3).round() / 1e3,
                    };
                    (model.clone(), stats)
                })
                .collect(),
            uptime_s: self.started.elapsed().as_secs(),
            last_ms: self.last_ms,
        }
    }
}

/// The retained `models` message: every bundle in `models.dir` with what its manifest declares.
pub(super) fn models_message(config: &Config) -> ModelsMessage {
    let listed = bundle::list(&config.models.dir).unwrap_or_else(|err| {
        log::warn!("{err:#}");
        Vec::new()
    });
    let models = listed
        .into_iter()
        .map(|entry| {
            let default = entry.id == config.models.default;
            match entry.bundle {
                Ok(b) => {
                    let d = &b.manifest.defaults;
                    ModelInfo {
                        kind: b.kind().to_string(),
                        name: b.manifest.name.clone(),
                        default,
                        defaults: ModelDefaults {
                            steps: d.steps,
                            guidance: d.guidance,
                            width: d.width,
                            height: d.height,
                            scheduler: d.scheduler.clone(),
                        },
                        classes: b
                            .manifest
                            .gan
                            .as_ref()
                            .map(|g| g.classes.clone())
                            .unwrap_or_default(),
                        error: None,
                        id: entry.id,
                    }
                }
                Err(reason) => ModelInfo {
                    id: entry.id,
                    kind: "broken".into(),
                    name: None,
                    default,
                    defaults: ModelDefaults::default(),
                    classes: Vec::new(),
                    error: Some(reason),
                },
            }
        })
        .collect();
    ModelsMessage {
        default: config.models.default.clone(),
        models,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_time_per_picture_per_model() {
        let mut stats = Stats::new();
        stats.record_done("a", 1, 30.0);
        stats.record_done("a", 2, 90.0);
        stats.record_done("b", 1, 5.0);
        let message = stats.message(2, Some("j".into()));
        assert_eq!((message.done, message.queue), (3, 2));
        assert_eq!(
            message.models["a"],
            ModelStats {
                images: 3,
                mean_ms: 40.0
            }
        );
        assert_eq!(message.models["b"].mean_ms, 5.0);
    }

    #[test]
    fn models_lists_bundles_and_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("empty-bundle")).unwrap();
        let mut config = Config::default();
        config.models.dir = dir.path().to_path_buf();
        config.models.default = "empty-bundle".into();
        let message = models_message(&config);
        assert_eq!(message.models.len(), 1);
        let entry = &message.models[0];
        assert_eq!((entry.kind.as_str(), entry.default), ("broken", true));
        assert!(
            entry
                .error
                .as_deref()
                .is_some_and(|e| e.contains("missing")),
            "{entry:?}"
        );
    }
}
