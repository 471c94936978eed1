//! Everything the daemon sends goes through here. Messages that must arrive
//! (results, pictures, subscriptions, retained state) wait in order while the
//! broker is unreachable and are handed to the MQTT client only while it is
//! connected; progress messages are dropped while it is not. A spool file tied to
//! a result is removed only once the result has been handed over.

use std::collections::VecDeque;
use std::path::PathBuf;

use rumqttc::v5::mqttbytes::v5::{Filter, Publish, PublishProperties, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;

enum Item {
    Publish {
        publish: Box<Publish>,
        then_remove: Option<PathBuf>,
        droppable: bool,
    },
    Subscribe(String),
}

pub struct Outbox {
    client: AsyncClient,
    queue: VecDeque<Item>,
    connected: bool,
    /// The broker's Maximum Packet Size, when it announced one.
    max_packet: Option<u32>,
}

/// Beyond this many waiting messages, progress messages are not queued.
const LOSSY_BACKLOG: usize = 256;

/// Fixed header, topic and properties on top of the payload, generously.
const PACKET_OVERHEAD: usize = 1024;

impl Outbox {
    pub fn new(client: AsyncClient) -> Self {
        Outbox {
            client,
            queue: VecDeque::new(),
            connected: false,
            max_packet: None,
        }
    }

    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    pub fn set_connected(&mut self, connected: bool, max_packet: Option<u32>) {
        self.connected = connected;
        if connected {
            self.max_packet = max_packet;
        } else {
            self.queue.retain(|item| {
                !matches!(
                    item,
                    Item::Publish {
                        droppable: true,
                        ..
                    }
                )
            });
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// True when a payload of this size fits the broker's packet limit.
    pub fn fits(&self, topic: &str, payload_len: usize) -> bool {
        match self.max_packet {
            Some(max) => payload_len + topic.len() + PACKET_OVERHEAD <= max as usize,
            None => true,
        }
    }

    /// Queues a message that must arrive; `then_remove` is deleted once it is handed over.
    pub fn reliable(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        properties: Option<PublishProperties>,
        then_remove: Option<PathBuf>,
    ) {
        if !rumqttc::v5::mqttbytes::valid_topic(topic) {
            // Topics are validated on the way in; this would otherwise block the queue forever.
            log::error!("not publishing to invalid topic {topic:?}");
            return;
        }
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload, properties);
        publish.retain = retain;
        self.queue.push_back(Item::Publish {
            publish: Box::new(publish),
            then_remove,
            droppable: false,
        });
    }

    pub fn subscribe(&mut self, filter: String) {
        self.queue.push_back(Item::Subscribe(filter));
    }

    /// Queues a message that is only worth sending while connected: it is
    /// dropped now, or later if the connection goes before it is handed over.
    pub fn lossy(&mut self, topic: &str, payload: Vec<u8>, qos: QoS, retain: bool) {
        if !self.connected || self.queue.len() >= LOSSY_BACKLOG {
            log::debug!("dropped a progress message to {topic}");
            return;
        }
        let mut publish = Publish::new(topic, qos, payload, None);
        publish.retain = retain;
        self.queue.push_back(Item::Publish {
            publish: Box::new(publish),
            then_remove: None,
            droppable: true,
        });
    }

    /// Hands queued messages to the client, in order, until it would block.
    /// Returns the spool files whose results are now out.
    pub fn flush(&mut self) -> Vec<PathBuf> {
        let mut done = Vec::new();
        while self.connected {
            let Some(item) = self.queue.front() else {
                break;
            };
            let sent = match item {
                Item::Publish { publish, .. } => {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    let result = match &publish.properties {
                        Some(p) => self.client.try_publish_with_properties(
                            topic,
                            publish.qos,
                            publish.retain,
                            publish.payload.clone(),
                            p.clone(),
                        ),
                        None => self.client.try_publish(
                            topic,
                            publish.qos,
                            publish.retain,
                            publish.payload.clone(),
                        ),
                    };
                    result.is_ok()
                }
                Item::Subscribe(filter) => self
                    .client
                    .try_subscribe_many([command_filter(filter)])
                    .is_ok(),
            };
            if !sent {
                break;
            }
            if let Some(Item::Publish {
                then_remove: Some(path),
                ..
            }) = self.queue.pop_front()
            {
                done.push(path);
            }
        }
        done
    }
}

/// The daemon subscribes only to command topics (requests, cancels). A
/// retained message there is a replay of an old command, sent again on every
/// new subscription, so it is never forwarded: a stale or junk retained
/// request must not run (or be answered) once per reconnect.
fn command_filter(filter: &str) -> Filter {
    let mut filter = Filter::new(filter, QoS::AtLeastOnce);
    filter.retain_forward_rule = RetainForwardRule::Never;
    filter
}
