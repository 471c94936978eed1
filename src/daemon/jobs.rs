//! Jobs as the daemon keeps them: the spool record, where answers go, and
//! what identifies an MQTT delivery.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::Publish;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mqtt::messages::ErrorBody;
use crate::mqtt::topics;
use crate::request::Request;

/// A job as written to the spool.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(super) struct SpooledJob {
    pub(super) id: String,
    /// The model's id, resolved at acceptance (the request may have named none).
    pub(super) model: String,
    /// The request with its `id` filled in.
    pub(super) request: Request,
    pub(super) received: String,
    #[serde(default)]
    pub(super) steps: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) response: Option<ResponseRoute>,
    /// Identifies the MQTT delivery, to recognise the broker redelivering a
    /// request whose acknowledgement was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) delivery: Option<String>,
}

/// MQTT 5 Response Topic and Correlation Data of a request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub(super) struct ResponseRoute {
    pub(super) topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) correlation_hex: Option<String>,
}

/// Where a request's answers go.
#[derive(Clone, Debug)]
pub(super) struct Routes {
    pub(super) id: String,
    pub(super) reply_to: Option<String>,
    pub(super) response: Option<ResponseRoute>,
}

pub(super) struct Job {
    pub(super) spooled: SpooledJob,
    pub(super) path: PathBuf,
    pub(super) accepted: Instant,
    /// Receipt to acceptance; unknown for jobs restored from the spool.
    pub(super) intake_ms: Option<f64>,
    /// Reply routes of duplicate requests that arrived while this job was
    /// unfinished (kept in memory only).
    pub(super) also_reply: Vec<Routes>,
}

impl Job {
    pub(super) fn id(&self) -> &str {
        &self.spooled.id
    }

    pub(super) fn routes(&self) -> Routes {
        Routes {
            id: self.spooled.id.clone(),
            reply_to: self.spooled.request.reply_to.clone(),
            response: self.spooled.response.clone(),
        }
    }
}

pub(super) struct Running {
    pub(super) job: Job,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) started: Instant,
    pub(super) step: u32,
    pub(super) steps: u32,
}

/// The MQTT 5 response route of a request. A response topic outside
/// `replies` is an error naming `response_topic`: the request is refused
/// (its error goes to the job topic), never answered there.
pub(super) fn response_route(
    publish: &Publish,
    replies: &topics::ReplyFilter,
) -> Result<Option<ResponseRoute>, ErrorBody> {
    let Some(properties) = publish.properties.as_ref() else {
        return Ok(None);
    };
    let Some(topic) = properties.response_topic.clone() else {
        return Ok(None);
    };
    replies
        .check(&topic)
        .map_err(|reason| ErrorBody::invalid_field("response_topic", reason))?;
    Ok(Some(ResponseRoute {
        topic,
        correlation_hex: properties.correlation_data.as_ref().map(|d| to_hex(d)),
    }))
}

/// Topic, payload digest and packet id: what a broker's redelivery repeats.
pub(super) fn delivery_key(publish: &Publish) -> String {
    let mut hasher = Sha256::new();
    hasher.update(&publish.topic);
    hasher.update([0]);
    hasher.update(&publish.payload);
    let digest = hasher.finalize();
    format!("{}-{}", to_hex(&digest[..8]), publish.pkid)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;

    #[test]
    fn hex_round_trip() {
        let data = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&data), "0001abff");
        assert_eq!(from_hex("0001abff").unwrap(), data);
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn redelivery_key_depends_on_packet_id_and_payload() {
        let a = Publish::new(
            "edgegen/n/request",
            QoS::AtLeastOnce,
            b"apple".to_vec(),
            None,
        );
        let mut b = a.clone();
        b.pkid = 9;
        let mut c = a.clone();
        c.payload = b"pear".to_vec().into();
        assert_ne!(delivery_key(&a), delivery_key(&b));
        assert_ne!(delivery_key(&a), delivery_key(&c));
        assert_eq!(delivery_key(&a), delivery_key(&a.clone()));
    }
}
