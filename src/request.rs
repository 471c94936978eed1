//! What a user asks for (CLI, MQTT or HTTP), and the settings it resolves to
//! once a model's defaults and the configured limits are applied.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scheduler::SchedulerKind;

/// A generation request; every field is optional, unknown fields are rejected.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub return_image: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// A request field that cannot be honoured, with what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Fully resolved generation settings: what the pipeline runs and what the
/// metadata records.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    pub guidance: f32,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    #[serde(serialize_with = "scheduler_name")]
    pub scheduler: Option<SchedulerKind>,
    pub class: Option<String>,
    pub batch: u32,
}

fn scheduler_name<S: serde::Serializer>(
    kind: &Option<SchedulerKind>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match kind {
        Some(kind) => serializer.serialize_some(kind.name()),
        None => serializer.serialize_none(),
    }
}

impl Settings {
    /// The AUTOMATIC1111 `parameters` text many image tools read.
    pub fn a1111_parameters(&self, model: &str) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        let mut fields = Vec::new();
        if let Some(scheduler) = self.scheduler {
            fields.push(format!("Steps: {}", self.steps));
            fields.push(format!("Sampler: {}", scheduler.name()));
            fields.push(format!("CFG scale: {}", self.guidance));
        }
        if let Some(class) = &self.class {
            fields.push(format!("Class: {class}"));
        }
        fields.push(format!("Seed: {}", self.seed));
        fields.push(format!("Size: {}x{}", self.width, self.height));
        fields.push(format!("Model: {model}"));
        text.push('\n');
        text.push_str(&fields.join(", "));
        text
    }
}

/// A seed for requests that give none.
pub fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return nanos & 0xffff_ffff;
    }
    // 32 bits: the generator only uses the low 32 bits, and short seeds are easy to retype.
    u64::from_le_bytes(bytes) & 0xffff_ffff
}
