//! edgegen: offline text-to-image generation on small devices — quantized
//! ONNX diffusion and GAN models run by tract, requests over MQTT.

pub mod bundle;
pub mod commands;
pub mod config;
pub mod engine;
pub mod generate;
pub mod picture;
pub mod pipeline;
pub mod request;
pub mod rng;
pub mod scheduler;
pub mod storage;
pub mod tokenizer;
