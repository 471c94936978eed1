//! Turning an MQTT payload into a `Request`: a JSON object or a bare UTF-8
//! prompt. Oversized payloads are refused before any parsing. JSON is read
//! into a map first and checked field by field, so every error names its field
//! (serde's type errors do not). A field given twice is an error too: JSON
//! parsers disagree on which copy wins, so a proxy and the daemon could
//! otherwise read different requests from the same bytes.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::config::Limits;
use crate::mqtt::messages::{ErrorBody, ErrorCode};
use crate::mqtt::topics::ReplyFilter;
use crate::request::Request;

/// A parsed request, or why not, with what could be salvaged for the reply.
#[derive(Debug)]
pub struct Intake {
    /// The request's own `id` when it is valid: the error goes to that job's topic.
    pub id: Option<String>,
    /// A valid `reply_to`, honoured even when the rest is invalid.
    pub reply_to: Option<String>,
    pub request: Result<Request, ErrorBody>,
}

/// Known request fields, for the unknown-field message.
pub const FIELDS: &[&str] = &[
    "id",
    "prompt",
    "negative_prompt",
    "model",
    "steps",
    "guidance",
    "width",
    "height",
    "seed",
    "scheduler",
    "class",
    "batch",
    "return_image",
    "reply_to",
];

/// `replies` is where `reply_to` may point (see `ReplyFilter`).
pub fn parse(payload: &[u8], limits: &Limits, replies: &ReplyFilter) -> Intake {
    let rejected = |error| Intake {
        id: None,
        reply_to: None,
        request: Err(error),
    };
    if payload.len() > limits.max_payload_bytes {
        return rejected(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "payload is {} bytes, at most {} allowed",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return rejected(ErrorBody::invalid_field("payload", "is not valid UTF-8"));
    };
    // A byte-order mark is not part of the request (some editors and tools add one).
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if !(trimmed.starts_with('{') || trimmed.starts_with('[')) {
        return match trimmed {
            "" => rejected(ErrorBody::invalid_field("prompt", "is empty")),
            prompt => Intake {
                id: None,
                reply_to: None,
                request: Ok(Request {
                    prompt: Some(prompt.to_string()),
                    ..Request::default()
                }),
            },
        };
    }
    if trimmed.starts_with('[') {
        return rejected(ErrorBody::invalid_field(
            "payload",
            "must be a JSON object or a bare prompt",
        ));
    }
    let object = match serde_json::from_str::<Object>(trimmed) {
        Ok(object) => object,
        Err(err) => {
            return rejected(ErrorBody::invalid_field(
                "payload",
                format!("is not valid JSON: {err}"),
            ))
        }
    };
    from_object(object, replies)
}

/// A JSON object's fields, and the first key that appeared more than once.
struct Object {
    map: Map<String, Value>,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Object;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Object, A::Error> {
                let mut map = Map::new();
                let mut duplicate = None;
                while let Some(key) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if map.contains_key(&key) && duplicate.is_none() {
                        duplicate = Some(key.clone());
                    }
                    map.insert(key, value);
                }
                Ok(Object { map, duplicate })
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

fn from_object(object: Object, replies: &ReplyFilter) -> Intake {
    let mut fields = Fields {
        map: object.map,
        duplicate: object.duplicate,
    };
    // id and reply_to first: they say where even an error result goes.
    let id = fields.string("id").and_then(|id| match id {
        Some(id) => check_id(&id)
            .map(|()| Some(id))
            .map_err(|reason| ErrorBody::invalid_field("id", reason)),
        None => Ok(None),
    });
    let reply_to = fields.string("reply_to").and_then(|topic| match topic {
        Some(topic) => replies
            .check(&topic)
            .map(|()| Some(topic))
            .map_err(|reason| ErrorBody::invalid_field("reply_to", reason)),
        None => Ok(None),
    });
    let good_id = id.as_ref().ok().cloned().flatten();
    let good_reply_to = reply_to.as_ref().ok().cloned().flatten();
    let request = id.and_then(|id| {
        let reply_to = reply_to?;
        fields.request(id, reply_to)
    });
    // Checked last so that a valid id still routes the error.
    let request = match fields.duplicate.take() {
        Some(key) => Err(ErrorBody::invalid_field(
            &key,
            "appears more than once in the request",
        )),
        None => request,
    };
    Intake {
        id: good_id,
        reply_to: good_reply_to,
        request,
    }
}

struct Fields {
    map: Map<String, Value>,
    /// A key given twice: it is neither used nor trusted to route an error.
    duplicate: Option<String>,
}

impl Fields {
    fn request(
        &mut self,
        id: Option<String>,
        reply_to: Option<String>,
    ) -> Result<Request, ErrorBody> {
        let request = Request {
            id,
            reply_to,
            prompt: self.string("prompt")?,
            negative_prompt: self.string("negative_prompt")?,
            model: self.string("model")?,
            steps: self.unsigned("steps")?,
            guidance: self.number("guidance")?,
            width: self.unsigned("width")?,
            height: self.unsigned("height")?,
            seed: self.seed()?,
            scheduler: self.string("scheduler")?,
            class: self.string("class")?,
            batch: self.unsigned("batch")?,
            return_image: self.boolean("return_image")?.unwrap_or(false),
        };
        if let Some(unknown) = self.map.keys().next() {
            return Err(ErrorBody::invalid_field(
                unknown,
                format!("unknown field (known fields: {})", FIELDS.join(", ")),
            ));
        }
        Ok(request)
    }

    /// Takes a field out of the map; `null` counts as absent.
    fn take(&mut self, name: &str) -> Option<Value> {
        let value = self.map.remove(name).filter(|v| !v.is_null());
        if self.duplicate.as_deref() == Some(name) {
            return None;
        }
        value
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, ErrorBody> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ErrorBody::invalid_field(
                name,
                format!("expected a string, got {}", kind(&other)),
            )),
        }
    }

    fn unsigned(&mut self, name: &str) -> Result<Option<u32>, ErrorBody> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ErrorBody::invalid_field(
                        name,
                        format!("expected an integer from 0 to {}, got {n}", u32::MAX),
                    )
                }),
            Some(other) => Err(ErrorBody::invalid_field(
                name,
                format!("expected an integer, got {}", kind(&other)),
            )),
        }
    }

    fn seed(&mut self) -> Result<Option<u64>, ErrorBody> {
        match self.take("seed") {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                ErrorBody::invalid_field(
                    "seed",
                    format!("expected an integer from 0 to {}, got {n}", u64::MAX),
                )
            }),
            Some(other) => Err(ErrorBody::invalid_field(
                "seed",
                format!("expected an integer, got {}", kind(&other)),
            )),
        }
    }

    fn number(&mut self, name: &str) -> Result<Option<f32>, ErrorBody> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64().map(|v| v as f32) {
                Some(v) if v.is_finite() => Ok(Some(v)),
                _ => Err(ErrorBody::invalid_field(
                    name,
                    format!("{n} is out of range"),
                )),
            },
            Some(other) => Err(ErrorBody::invalid_field(
                name,
                format!("expected a number, got {}", kind(&other)),
            )),
        }
    }

    fn boolean(&mut self, name: &str) -> Result<Option<bool>, ErrorBody> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(ErrorBody::invalid_field(
                name,
                format!("expected true or false, got {}", kind(&other)),
            )),
        }
    }
}

fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Job ids: `[A-Za-z0-9_-]{1,64}`. They become file names and topic levels,
/// so nothing else is allowed.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!(
            "must be 1 to 64 characters, got {}",
            id.chars().count()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(format!(
            "contains {c:?}; only letters, digits, '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// A fresh job id: UTC time (so ids sort by arrival) and 32 random bits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 4];
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes = nanos.to_le_bytes();
    }
    format!(
        "{}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        u32::from_le_bytes(bytes)
    )
}

/// The job id of a cancel payload: `{"id": "..."}` or the bare id.
pub fn parse_cancel(payload: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| "payload is not valid UTF-8".to_string())?
        .trim();
    let id = if text.starts_with('{') {
        serde_json::from_str::<crate::mqtt::messages::CancelMessage>(text)
            .map_err(|e| format!("expected {{\"id\": \"...\"}}: {e}"))?
            .id
    } else {
        text.to_string()
    };
    check_id(&id).map_err(|reason| format!("id {reason}"))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn replies() -> ReplyFilter {
        ReplyFilter::for_config(&crate::config::MqttConfig::default())
    }

    fn parse(payload: &[u8], limits: &Limits) -> Intake {
        super::parse(payload, limits, &replies())
    }

    fn error_of(payload: &str) -> ErrorBody {
        parse(payload.as_bytes(), &limits()).request.unwrap_err()
    }

    #[test]
    fn bare_prompt() {
        let intake = parse(b"  a red apple on a tree\n", &limits());
        assert_eq!(
            intake.request.unwrap().prompt.as_deref(),
            Some("a red apple on a tree")
        );
    }

    #[test]
    fn json_request() {
        let payload = r#"{"id":"job-1","prompt":"apple","steps":4,"guidance":7.5,"seed":18446744073709551615,
            "width":64,"height":64,"return_image":true,"reply_to":"edgegen/reply/app","negative_prompt":null}"#;
        let request = parse(payload.as_bytes(), &limits()).request.unwrap();
        assert_eq!(request.id.as_deref(), Some("job-1"));
        assert_eq!(request.steps, Some(4));
        assert_eq!(request.seed, Some(u64::MAX));
        assert!(request.return_image);
        assert_eq!(request.reply_to.as_deref(), Some("edgegen/reply/app"));
        assert_eq!(request.negative_prompt, None);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (r#"{"prompt": 3}"#, "prompt"),
            (r#"{"steps": "four"}"#, "steps"),
            (r#"{"steps": -1}"#, "steps"),
            (r#"{"steps": 2.5}"#, "steps"),
            (r#"{"width": 1e12}"#, "width"),
            (r#"{"guidance": "high"}"#, "guidance"),
            (r#"{"seed": -5}"#, "seed"),
            (r#"{"return_image": "yes"}"#, "return_image"),
            (r#"{"id": "../etc"}"#, "id"),
            (r#"{"id": ""}"#, "id"),
            (r#"{"reply_to": "a/#"}"#, "reply_to"),
            (r#"{"reply_to": "edgegen/kiosk1/request"}"#, "reply_to"),
            (r#"{"prompt": "x", "prompt": "y"}"#, "prompt"),
            (r#"{"id": "a", "id": "b"}"#, "id"),
            (r#"{"prompt": "x", "colour": "red"}"#, "colour"),
            (r#"["a"]"#, "payload"),
            (r#"{"prompt": "#, "payload"),
            ("", "prompt"),
        ];
        for (payload, field) in cases {
            let error = error_of(payload);
            assert_eq!(error.code, ErrorCode::InvalidRequest, "{payload}");
            assert_eq!(
                error.field.as_deref(),
                Some(field),
                "{payload}: {}",
                error.message
            );
            assert!(
                error.message.starts_with(field),
                "{payload}: {}",
                error.message
            );
        }
    }

    #[test]
    fn valid_id_and_reply_to_survive_other_errors() {
        let intake = parse(
            br#"{"id":"j7","reply_to":"edgegen/reply/1","steps":"x"}"#,
            &limits(),
        );
        assert_eq!(intake.id.as_deref(), Some("j7"));
        assert_eq!(intake.reply_to.as_deref(), Some("edgegen/reply/1"));
        assert!(intake.request.is_err());
    }

    #[test]
    fn a_duplicated_id_routes_nothing() {
        let intake = parse(br#"{"id":"a","prompt":"x","id":"b"}"#, &limits());
        assert_eq!(intake.id, None);
        assert_eq!(intake.request.unwrap_err().field.as_deref(), Some("id"));
        let intake = parse(br#"{"id":"a","prompt":"x","prompt":"y"}"#, &limits());
        assert_eq!(intake.id.as_deref(), Some("a"));
    }

    #[test]
    fn byte_order_mark_is_ignored() {
        let request = parse("\u{feff}{\"prompt\":\"x\"}".as_bytes(), &limits())
            .request
            .unwrap();
        assert_eq!(request.prompt.as_deref(), Some("x"));
    }

    #[test]
    fn oversized_payload_is_refused_unparsed() {
        let limits = Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        };
        let intake = parse(br#"{"id":"visible-but-not-parsed"}"#, &limits);
        assert_eq!(intake.request.unwrap_err().code, ErrorCode::TooLarge);
        assert_eq!(intake.id, None);
    }

    #[test]
    fn ids() {
        assert!(check_id("abc_DEF-123").is_ok());
        assert!(check_id(&"a".repeat(64)).is_ok());
        assert!(check_id(&"a".repeat(65)).is_err());
        assert!(check_id("a.b").is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id(&new_id()).is_ok());
    }

    #[test]
    fn cancel_payloads() {
        assert_eq!(parse_cancel(br#"{"id":"j1"}"#).unwrap(), "j1");
        assert_eq!(parse_cancel(b"j2").unwrap(), "j2");
        assert!(parse_cancel(br#"{"id":"../x"}"#).is_err());
        assert!(parse_cancel(br#"{"job":"j1"}"#).is_err());
    }
}
