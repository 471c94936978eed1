//! Home Assistant MQTT discovery: the retained `config` messages that make a
//! node appear in Home Assistant as one device with a picture, a prompt box
//! and two sensors, all tied to the node's availability (Last Will) topic.

use serde_json::{json, Value};

use super::messages::{OFFLINE, ONLINE};
use super::topics::Topics;

/// Home Assistant's default discovery prefix.
pub const DISCOVERY_PREFIX: &str = "homeassistant";
/// Home Assistant publishes `online` here when it starts (its birth message);
/// discovery is published again then, as it may have lost it.
pub const STATUS_TOPIC: &str = "homeassistant/status";
pub const BIRTH: &str = "online";
/// Home Assistant's text entities hold at most 255 characters.
const TEXT_MAX: usize = 255;

/// One retained discovery message.
#[derive(Clone, Debug, PartialEq)]
pub struct Discovery {
    pub topic: String,
    pub payload: Value,
}

/// The discovery messages of a node whose prompts may be `max_prompt_chars` long.
pub fn discovery(topics: &Topics, max_prompt_chars: usize) -> Vec<Discovery> {
    let node = object_id(topics.node());
    let entity = |component: &str, object: &str, fields: Value| {
        let mut payload = common(topics, &node, object);
        if let (Some(payload), Value::Object(fields)) = (payload.as_object_mut(), fields) {
            payload.extend(fields);
        }
        Discovery {
            topic: format!("{DISCOVERY_PREFIX}/{component}/{node}/{object}/config"),
            payload,
        }
    };
    vec![
        entity(
            "image",
            "picture",
            json!({
                "name": "Picture",
                "image_topic": topics.latest_image(),
                "content_type": "image/png",
            }),
        ),
        entity(
            "text",
            "prompt",
            json!({
                "name": "Prompt",
                // A bare UTF-8 prompt is a complete request.
                "command_topic": topics.request(),
                "min": 1,
                "max": max_prompt_chars.min(TEXT_MAX),
                "mode": "text",
                "icon": "mdi:draw",
            }),
        ),
        entity(
            "sensor",
            "queue",
            json!({
                "name": "Queue",
                "state_topic": topics.stats(),
                "value_template": "{{ value_json.queue }}",
                "unit_of_measurement": "jobs",
                "state_class": "measurement",
                "icon": "mdi:tray-full",
            }),
        ),
        entity(
            "sensor",
            "last_generation",
            json!({
                "name": "Last generation time",
                "state_topic": topics.stats(),
                // `null` before the first picture renders as "None": state unknown.
                "value_template": "{{ value_json.last_ms }}",
                "unit_of_measurement": "ms",
                "device_class": "duration",
                "state_class": "measurement",
            }),
        ),
    ]
}

/// Keys every entity of the node shares: identity, device and availability.
fn common(topics: &Topics, node: &str, object: &str) -> Value {
    json!({
        "unique_id": format!("edgegen_{node}_{object}"),
        "availability_topic": topics.availability(),
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "qos": 1,
        "device": {
            "identifiers": [format!("edgegen_{node}")],
            "name": format!("edgegen {}", topics.node()),
            "manufacturer": "edgegen",
            "model": "edgegen image generator",
            "sw_version": env!("CARGO_PKG_VERSION"),
        },
        "origin": {
            "name": "edgegen",
            "sw_version": env!("CARGO_PKG_VERSION"),
        },
    })
}

/// Discovery topic levels and unique ids allow only `[A-Za-z0-9_-]`; node ids
/// may also hold dots (host names).
fn object_id(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_four_entities_with_distinct_ids() {
        let topics = Topics::new("edgegen", "pi.local").unwrap();
        let messages = discovery(&topics, 1000);
        let mut ids: Vec<_> = messages
            .iter()
            .map(|m| m.payload["unique_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4);
        assert_eq!(
            messages[1].topic,
            "homeassistant/text/pi_local/prompt/config"
        );
        assert_eq!(messages[1].payload["max"], 255);
        for m in &messages {
            assert_eq!(m.payload["device"]["identifiers"][0], "edgegen_pi_local");
            assert_eq!(
                m.payload["availability_topic"],
                "edgegen/pi.local/availability"
            );
        }
    }
}
