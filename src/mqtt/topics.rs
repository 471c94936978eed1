//! Every MQTT topic edgegen reads or writes, built in one place so the
//! layout in the design (and the README) has a single source.

use anyhow::{bail, Result};

/// Topic names of one node: `<prefix>/<node>/...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    node: String,
}

/// What an incoming topic is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    Request,
    /// A request on the fleet topic, delivered through the shared subscription.
    FleetRequest,
    Cancel,
    Other,
}

impl Topics {
    /// Fails when `prefix` or `node` would change the topic structure
    /// (empty, or containing `/`, `+`, `#`).
    pub fn new(prefix: &str, node: &str) -> Result<Topics> {
        check_level("mqtt.prefix", prefix)?;
        check_level("mqtt.node_id", node)?;
        Ok(Topics {
            prefix: prefix.to_string(),
            node: node.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn node_topic(&self, tail: &str) -> String {
        format!("{}/{}/{tail}", self.prefix, self.node)
    }

    pub fn request(&self) -> String {
        self.node_topic("request")
    }

    /// The fleet topic that shared subscriptions deliver from.
    pub fn fleet_request(&self) -> String {
        format!("{}/request", self.prefix)
    }

    /// `$share/<group>/<prefix>/request`: each fleet request goes to one daemon of the group.
    pub fn shared_request(&self, group: &str) -> String {
        format!("$share/{group}/{}", self.fleet_request())
    }

    pub fn cancel(&self) -> String {
        self.node_topic("cancel")
    }

    pub fn job_status(&self, id: &str) -> String {
        self.node_topic(&format!("job/{id}/status"))
    }

    pub fn job_result(&self, id: &str) -> String {
        self.node_topic(&format!("job/{id}/result"))
    }

    /// The picture of a job; pictures 2, 3, … of a batch go to `image/2`, `image/3`, ….
    pub fn job_image(&self, id: &str, index: usize) -> String {
        match index {
            0 => self.node_topic(&format!("job/{id}/image")),
            n => self.node_topic(&format!("job/{id}/image/{}", n + 1)),
        }
    }

    /// Filter matching every message about one job.
    pub fn job_filter(&self, id: &str) -> String {
        self.node_topic(&format!("job/{id}/#"))
    }

    pub fn availability(&self) -> String {
        self.node_topic("availability")
    }

    pub fn stats(&self) -> String {
        self.node_topic("stats")
    }

    pub fn models(&self) -> String {
        self.node_topic("models")
    }

    /// The last picture the node made (retained; for Home Assistant's image entity).
    pub fn latest_image(&self) -> String {
        self.node_topic("latest/image")
    }

    pub fn classify(&self, topic: &str) -> Inbound {
        if topic == self.request() {
            Inbound::Request
        } else if topic == self.fleet_request() {
            Inbound::FleetRequest
        } else if topic == self.cancel() {
            Inbound::Cancel
        } else {
            Inbound::Other
        }
    }
}

fn check_level(key: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        bail!("{key} is empty");
    }
    if let Some(c) = value.chars().find(|c| matches!(c, '/' | '+' | '#' | '\0')) {
        bail!("{key} '{value}' contains '{c}', which is not allowed in one topic level");
    }
    Ok(())
}

/// A host name made safe for one topic level: every character other than
/// letters, digits, `-`, `_` and `.` becomes `-`.
pub fn sanitize_node_id(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "edgegen".to_string()
    } else {
        cleaned
    }
}

/// `mqtt.node_id`, or the host name when it is empty.
pub fn node_id(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    sanitize_node_id(&gethostname::gethostname().to_string_lossy())
}

/// Where clients may have the daemon publish their answers (`reply_to`, MQTT 5
/// Response Topic): an MQTT topic filter, `<prefix>/reply/#` unless
/// `mqtt.reply_filter` says otherwise.
///
/// Without it a client could make the daemon publish into any topic the
/// daemon may write but the client may not (a confused deputy): another
/// node's request topic, a retained state topic, a topic a third party reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyFilter(String);

impl ReplyFilter {
    /// The configured filter, or `<prefix>/reply/#` when `mqtt.reply_filter` is empty.
    pub fn for_config(mqtt: &crate::config::MqttConfig) -> ReplyFilter {
        if mqtt.reply_filter.is_empty() {
            ReplyFilter(format!("{}/reply/#", mqtt.prefix))
        } else {
            ReplyFilter(mqtt.reply_filter.clone())
        }
    }

    /// Fails when the filter is not a valid MQTT topic filter.
    pub fn validate(&self) -> Result<()> {
        let filter = &self.0;
        if !rumqttc::v5::mqttbytes::valid_filter(filter) || filter.contains('\0') {
            bail!("mqtt.reply_filter '{filter}' is not a valid MQTT topic filter");
        }
        if filter.starts_with('$') {
            bail!("mqtt.reply_filter '{filter}' must not be a '$' system topic");
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks a topic a request names for its answer.
    pub fn check(&self, topic: &str) -> Result<(), String> {
        check_reply_topic(topic)?;
        if !filter_matches(&self.0, topic) {
            return Err(format!(
                "'{topic}' is not under '{}' (mqtt.reply_filter), where replies may go",
                self.0
            ));
        }
        Ok(())
    }
}

/// MQTT matching of a topic name against a filter: `+` is one level, a final
/// `#` is the rest (including none).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// A topic a client may name for replies: non-empty, no wildcards, not a `$` system topic.
fn check_reply_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("is empty".into());
    }
    if topic.len() > 1024 {
        return Err(format!(
            "is {} bytes long, at most 1024 allowed",
            topic.len()
        ));
    }
    if topic.contains(['+', '#', '\0']) {
        return Err("must be a topic name without wildcards ('+', '#')".into());
    }
    if topic.starts_with('$') {
        return Err("must not be a '$' system topic".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        let t = Topics::new("edgegen", "kiosk1").unwrap();
        assert_eq!(t.request(), "edgegen/kiosk1/request");
        assert_eq!(t.cancel(), "edgegen/kiosk1/cancel");
        assert_eq!(t.job_status("a1"), "edgegen/kiosk1/job/a1/status");
        assert_eq!(t.job_result("a1"), "edgegen/kiosk1/job/a1/result");
        assert_eq!(t.job_image("a1", 0), "edgegen/kiosk1/job/a1/image");
        assert_eq!(t.job_image("a1", 1), "edgegen/kiosk1/job/a1/image/2");
        assert_eq!(t.availability(), "edgegen/kiosk1/availability");
        assert_eq!(t.stats(), "edgegen/kiosk1/stats");
        assert_eq!(t.models(), "edgegen/kiosk1/models");
        assert_eq!(
            t.shared_request("edgegen"),
            "$share/edgegen/edgegen/request"
        );
        assert_eq!(t.classify("edgegen/request"), Inbound::FleetRequest);
        assert_eq!(t.classify("edgegen/kiosk1/cancel"), Inbound::Cancel);
        assert_eq!(t.classify("edgegen/other/request"), Inbound::Other);
    }

    #[test]
    fn levels_with_wildcards_are_refused() {
        assert!(Topics::new("edgegen", "a/b").is_err());
        assert!(Topics::new("edge+gen", "a").is_err());
        assert!(Topics::new("edgegen", "").is_err());
        assert_eq!(sanitize_node_id("my host/1"), "my-host-1");
    }

    #[test]
    fn reply_topics() {
        let mut mqtt = crate::config::MqttConfig::default();
        let default = ReplyFilter::for_config(&mqtt);
        assert_eq!(default.as_str(), "edgegen/reply/#");
        assert!(default.validate().is_ok());
        assert!(default.check("edgegen/reply/app/7").is_ok());
        assert!(default.check("edgegen/reply").is_ok());
        assert!(default.check("app/replies/7").is_err());
        assert!(default.check("edgegen/kiosk1/request").is_err());
        assert!(default.check("edgegen/reply/+/x").is_err());
        assert!(default.check("edgegen/reply/a\0").is_err());
        assert!(default.check("").is_err());
        mqtt.reply_filter = "#".into();
        let any = ReplyFilter::for_config(&mqtt);
        assert!(any.check("app/replies/7").is_ok());
        assert!(any.check("$SYS/x").is_err());
        mqtt.reply_filter = "apps/+/replies".into();
        let one_level = ReplyFilter::for_config(&mqtt);
        assert!(one_level.check("apps/a/replies").is_ok());
        assert!(one_level.check("apps/a/replies/x").is_err());
        assert!(one_level.check("apps/replies").is_err());
        for bad in ["a/#/b", "a+/b", "$SYS/#", ""] {
            mqtt.reply_filter = bad.into();
            // An empty key means the default, which is valid.
            assert_eq!(
                ReplyFilter::for_config(&mqtt).validate().is_ok(),
                bad.is_empty(),
                "{bad}"
            );
        }
    }
}
