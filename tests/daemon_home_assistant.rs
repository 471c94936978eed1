//! Home Assistant MQTT discovery against a real Mosquitto: the retained
//! `config` messages follow Home Assistant's schemas for the image, text and
//! sensor platforms, and a prompt typed into the text entity comes back as a
//! picture on the image entity's topic.

mod mqtt_support;

use std::collections::{BTreeMap, BTreeSet};

use mqtt_support::{Daemon, DaemonConfig, Mosquitto, Msg, Probe, WAIT};
use serde_json::Value;

/// Keys every MQTT entity accepts (availability, identity, device, origin).
const COMMON_KEYS: &[&str] = &[
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "payload_available",
    "payload_not_available",
    "device",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "default_entity_id",
    "object_id",
    "origin",
    "qos",
    "unique_id",
];

/// Platform keys (Home Assistant's `image`, `text` and `sensor` MQTT schemas).
fn platform_keys(component: &str) -> &'static [&'static str] {
    match component {
        "image" => &[
            "image_topic",
            "url_topic",
            "url_template",
            "content_type",
            "image_encoding",
        ],
        "text" => &[
            "command_topic",
            "command_template",
            "state_topic",
            "value_template",
            "min",
            "max",
            "mode",
            "pattern",
            "retain",
        ],
        "sensor" => &[
            "state_topic",
            "value_template",
            "unit_of_measurement",
            "device_class",
            "state_class",
            "expire_after",
            "force_update",
            "last_reset_value_template",
            "suggested_display_precision",
            "options",
        ],
        other => panic!("unexpected component {other}"),
    }
}

const DEVICE_KEYS: &[&str] = &[
    "identifiers",
    "connections",
    "name",
    "manufacturer",
    "model",
    "model_id",
    "sw_version",
    "hw_version",
    "serial_number",
    "suggested_area",
    "via_device",
    "configuration_url",
];

const DURATION_UNITS: &[&str] = &["d", "h", "min", "s", "ms", "µs"];

/// Checks one discovery payload the way Home Assistant's schema would, but
/// strictly: a key Home Assistant does not know is an error here (it would
/// silently drop it).
fn check_entity(component: &str, payload: &Value) {
    let object = payload.as_object().expect("payload is a JSON object");
    let allowed: BTreeSet<&str> = COMMON_KEYS
        .iter()
        .chain(platform_keys(component))
        .copied()
        .collect();
    for key in object.keys() {
        assert!(
            allowed.contains(key.as_str()),
            "{component}: unknown key {key}"
        );
    }
    let text = |key: &str| object.get(key).and_then(Value::as_str);
    assert!(text("unique_id").is_some_and(|id| !id.is_empty()));
    let device = object["device"].as_object().expect("device object");
    for key in device.keys() {
        assert!(
            DEVICE_KEYS.contains(&key.as_str()),
            "device: unknown key {key}"
        );
    }
    let identifiers = device["identifiers"]
        .as_array()
        .expect("device identifiers");
    assert!(!identifiers.is_empty());
    assert!(object["origin"]["name"].is_string(), "origin needs a name");
    assert!(text("availability_topic").is_some());
    assert!(
        !object.contains_key("availability"),
        "availability_topic excludes availability"
    );
    match component {
        "image" => {
            let topics = ["image_topic", "url_topic"].map(|k| object.contains_key(k));
            assert!(
                topics[0] ^ topics[1],
                "image: exactly one of image_topic, url_topic"
            );
            assert_eq!(text("content_type"), Some("image/png"));
        }
        "text" => {
            assert!(text("command_topic").is_some(), "text needs command_topic");
            let max = object["max"].as_u64().expect("max");
            let min = object["min"].as_u64().unwrap_or(0);
            assert!(max <= 255 && min <= max, "text: 0 <= min <= max <= 255");
            assert!(matches!(
                text("mode"),
                None | Some("text") | Some("password")
            ));
        }
        "sensor" => {
            assert!(text("state_topic").is_some(), "sensor needs state_topic");
            if text("device_class") == Some("duration") {
                let unit = text("unit_of_measurement").expect("duration needs a unit");
                assert!(DURATION_UNITS.contains(&unit), "duration unit {unit}");
            }
            assert!(matches!(
                text("state_class"),
                None | Some("measurement") | Some("total") | Some("total_increasing")
            ));
        }
        _ => unreachable!(),
    }
}

fn discovery(messages: &[Msg]) -> BTreeMap<String, Value> {
    messages
        .iter()
        .filter(|m| m.topic.starts_with("homeassistant/") && m.topic.ends_with("/config"))
        .map(|m| (m.topic.clone(), m.json()))
        .collect()
}

/// The field a sensor's `value_template` reads from the stats message.
fn template_field(template: &str) -> &str {
    template
        .trim_start_matches("{{ value_json.")
        .trim_end_matches(" }}")
}

#[test]
fn discovery_follows_the_schema_and_a_typed_prompt_becomes_a_picture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let mut config = DaemonConfig::new(&broker.url(), "ha");
    config.mqtt_extra = "home_assistant = true".into();
    let daemon = Daemon::start(&dir.path().join("daemon"), config);
    let topics = daemon.topics();

    // A client that comes later, like Home Assistant, finds it all retained.
    let ha = Probe::connect(broker.port, "home-assistant", false);
    ha.subscribe(&topics.availability());
    ha.wait_payload(&topics.availability(), "online", 1);
    ha.subscribe("homeassistant/#");
    ha.wait("four discovery messages", WAIT, |m| discovery(m).len() == 4);
    let configs = discovery(&ha.messages());
    assert!(ha
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/config"))
        .all(|m| m.retain));

    let mut unique_ids = BTreeSet::new();
    let mut by_component: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (topic, payload) in &configs {
        let levels: Vec<&str> = topic.split('/').collect();
        let [_, component, node, object, _] = levels.as_slice() else {
            panic!("discovery topic {topic} is not <prefix>/<component>/<node>/<object>/config");
        };
        assert!([node, object].iter().all(|l| l
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')));
        check_entity(component, payload);
        assert_eq!(
            payload["availability_topic"],
            topics.availability().as_str()
        );
        assert!(
            unique_ids.insert(payload["unique_id"].to_string()),
            "duplicate unique_id"
        );
        by_component
            .entry(component.to_string())
            .or_default()
            .push(payload.clone());
    }
    assert_eq!(by_component["image"].len(), 1);
    assert_eq!(by_component["text"].len(), 1);
    assert_eq!(by_component["sensor"].len(), 2);
    let devices: BTreeSet<String> = configs
        .values()
        .map(|p| p["device"]["identifiers"].to_string())
        .collect();
    assert_eq!(devices.len(), 1, "all entities belong to one device");

    let image_topic = by_component["image"][0]["image_topic"]
        .as_str()
        .unwrap()
        .to_string();
    let command_topic = by_component["text"][0]["command_topic"]
        .as_str()
        .unwrap()
        .to_string();
    ha.subscribe(&image_topic);
    ha.publish(&command_topic, "a red apple on a tree");
    let got = ha.wait("a picture on the image topic", WAIT, |m| {
        m.iter().any(|m| m.topic == image_topic)
    });
    let picture = got.iter().find(|m| m.topic == image_topic).unwrap();
    assert!(picture.payload.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let decoded = image::load_from_memory(&picture.payload).expect("decodes");
    assert!(decoded.width() > 0);

    // Both sensors read a field the stats message has; the generation time is a number now.
    let stats_topic = topics.stats();
    ha.subscribe(&stats_topic);
    let stats = ha.wait("stats with a generation time", WAIT, |m| {
        m.iter()
            .any(|m| m.topic == stats_topic && m.json::<Value>()["last_ms"].is_number())
    });
    let stats: Value = stats
        .iter()
        .rev()
        .find(|m| m.topic == stats_topic)
        .unwrap()
        .json();
    for sensor in &by_component["sensor"] {
        assert_eq!(sensor["state_topic"], stats_topic.as_str());
        let field = template_field(sensor["value_template"].as_str().unwrap());
        assert!(stats[field].is_number(), "stats field {field}: {stats}");
    }

    // A client connecting afterwards sees the last picture (retained).
    let late = Probe::connect(broker.port, "late-dashboard", false);
    late.subscribe(&image_topic);
    late.wait("the retained picture", WAIT, |m| {
        m.iter().any(|m| m.topic == image_topic && m.retain)
    });

    // Home Assistant's birth message makes the node publish discovery again.
    let before = ha
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/config"))
        .count();
    ha.publish("homeassistant/status", "online");
    ha.wait("discovery after the birth message", WAIT, |m| {
        m.iter().filter(|m| m.topic.ends_with("/config")).count() >= before + 4
    });
}
