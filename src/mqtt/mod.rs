//! The MQTT interface: topic layout, message types, the connection, and the
//! `edgegen request` client.

pub mod client;
pub mod home_assistant;
pub mod messages;
pub mod relay;
pub mod requester;
pub mod topics;
