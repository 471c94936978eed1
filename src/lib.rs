//! edgegen: offline text-to-image generation on small devices — quantized
//! ONNX diffusion and GAN models run by tract, requests over MQTT.

pub mod bench;
pub mod broker;
pub mod bundle;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod engine;
pub mod file_stamp;
pub mod generate;
pub mod kiosk;
pub mod mqtt;
pub mod picture;
pub mod pipeline;
pub mod request;
pub mod retention;
pub mod rng;
pub mod scheduler;
pub mod spool;
pub mod storage;
pub mod tokenizer;
