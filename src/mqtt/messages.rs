//! JSON payloads of the MQTT interface: status, result (success or error),
//! models and stats. Field names are part of the published contract.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Life cycle of a job.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

/// `error.code` of a failed result.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    UnknownModel,
    Busy,
    TooLarge,
    Cancelled,
    StorageFull,
    ModelError,
    Internal,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// `<prefix>/<node>/job/<id>/status`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Status {
    pub id: String,
    pub state: JobState,
    pub step: u32,
    pub steps: u32,
    /// Jobs ahead of this one, the running job included; 0 once it runs.
    pub queue_position: usize,
}

/// `{"code", "message"}`; `field` names the request field an `invalid_request` is about.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid_field(field: &str, reason: impl fmt::Display) -> Self {
        ErrorBody {
            code: ErrorCode::InvalidRequest,
            message: format!("{field}: {reason}"),
            field: Some(field.to_string()),
        }
    }
}

/// One stored picture of a result.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ImageInfo {
    pub path: String,
    pub sha256: String,
    pub seed: u64,
}

/// Milliseconds per component, plus the daemon's own share.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ResultTimings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_decoder_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_ms: Option<f64>,
    /// Generation (all components).
    pub total_ms: f64,
    /// From receipt of the request to its acceptance (checks, spool write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intake_ms: Option<f64>,
    /// From acceptance to the start of generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// Encoding and storing the files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_ms: Option<f64>,
}

impl From<&crate::pipeline::Timings> for ResultTimings {
    fn from(t: &crate::pipeline::Timings) -> Self {
        ResultTimings {
            text_encoder_ms: t.text_encoder_ms,
            unet_ms: t.unet_ms,
            vae_decoder_ms: t.vae_decoder_ms,
            generator_ms: t.generator_ms,
            total_ms: t.total_ms,
            intake_ms: None,
            queue_ms: None,
            store_ms: None,
        }
    }
}

/// `<prefix>/<node>/job/<id>/result`: exactly one per request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct JobResult {
    pub id: String,
    pub state: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The (first) PNG and its JSON sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<ResultTimings>,
    /// True when the id already had a stored result and nothing was generated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_storage: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl JobResult {
    pub fn failed(id: &str, error: ErrorBody) -> Self {
        let state = if error.code == ErrorCode::Cancelled {
            JobState::Cancelled
        } else {
            JobState::Failed
        };
        JobResult {
            id: id.to_string(),
            state: Some(state),
            error: Some(error),
            ..JobResult::default()
        }
    }
}

/// Defaults of an installed model, as far as its bundle declares them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ModelDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
}

/// One entry of the retained `models` message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModelInfo {
    pub id: String,
    /// `diffusion`, `gan`, or `broken` (then `error` says why).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    #[serde(default)]
    pub defaults: ModelDefaults,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `<prefix>/<node>/models` (retained).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModelsMessage {
    pub default: String,
    pub models: Vec<ModelInfo>,
}

/// Per-model counters of the stats message.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ModelStats {
    pub images: u64,
    /// Mean generation time per picture.
    pub mean_ms: f64,
}

/// `<prefix>/<node>/stats` (retained, QoS 0).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct StatsMessage {
    /// Accepted, unfinished jobs (the running one included).
    pub queue: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Requests answered with an error before they were queued.
    pub rejected: u64,
    pub models: BTreeMap<String, ModelStats>,
    pub uptime_s: u64,
    /// Generation time of the last finished job; `null` before the first.
    #[serde(default)]
    pub last_ms: Option<f64>,
}

/// `<prefix>/<node>/cancel`: `{"id": "..."}` (a bare id is accepted too).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CancelMessage {
    pub id: String,
}

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_result_shape() {
        let r = JobResult::failed(
            "j1",
            ErrorBody::invalid_field("steps", "0 is not between 1 and 50"),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "j1",
                "state": "failed",
                "error": {"code": "invalid_request", "message": "steps: 0 is not between 1 and 50", "field": "steps"}
            })
        );
        assert_eq!(ErrorCode::StorageFull.to_string(), "storage_full");
    }

    #[test]
    fn cancelled_result_state() {
        let r = JobResult::failed("j1", ErrorBody::new(ErrorCode::Cancelled, "cancelled"));
        assert_eq!(r.state, Some(JobState::Cancelled));
    }

    #[test]
    fn status_shape() {
        let s = Status {
            id: "a".into(),
            state: JobState::Running,
            step: 2,
            steps: 4,
            queue_position: 0,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"id": "a", "state": "running", "step": 2, "steps": 4, "queue_position": 0})
        );
    }
}
