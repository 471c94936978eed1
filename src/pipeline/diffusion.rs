//! Latent diffusion: text encoder → denoising loop (with classifier-free
//! guidance or an LCM guidance embedding) → VAE / TAESD decoder, in the order
//! and with the arithmetic of diffusers' `StableDiffusionPipeline` and
//! `LatentConsistencyModelPipeline`.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{concatenate, ArrayD, Axis, IxDyn};
use serde::Deserialize;

use super::{
    check_common, millis, Cancelled, Component, Generated, LoadOptions, StepHook, Timings,
};
use crate::bundle::Bundle;
use crate::config::Limits;
use crate::engine::{Input, OnnxModel};
use crate::picture;
use crate::request::{random_seed, FieldError, Request, Settings};
use crate::rng::TorchGenerator;
use crate::scheduler::{self, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;

/// The parts of `unet/config.json` the pipeline needs.
#[derive(Clone, Debug, Deserialize)]
struct UnetConfig {
    #[serde(default = "default_latent_channels")]
    in_channels: usize,
    sample_size: Option<usize>,
    time_cond_proj_dim: Option<usize>,
}

/// The parts of `vae_decoder/config.json` the pipeline needs.
#[derive(Clone, Debug, Deserialize)]
struct VaeConfig {
    #[serde(default = "default_scaling_factor")]
    scaling_factor: f32,
    shift_factor: Option<f32>,
    block_out_channels: Option<Vec<usize>>,
    latent_channels: Option<usize>,
}

fn default_latent_channels() -> usize {
    4
}

fn default_scaling_factor() -> f32 {
    0.18215
}

fn read_json_or<T: for<'de> Deserialize<'de>>(path: &Path, fallback: T) -> Result<T> {
    if !path.is_file() {
        return Ok(fallback);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Input names of the UNet, as the graph declares them.
struct UnetInputs {
    sample: String,
    timestep: String,
    hidden_states: String,
    timestep_cond: Option<String>,
}

pub struct DiffusionPipeline {
    id: String,
    tokenizer: ClipTokenizer,
    text_encoder: Component,
    unet: Component,
    vae_decoder: Component,
    unet_inputs: UnetInputs,
    scheduler_config: SchedulerConfig,
    default_scheduler: SchedulerKind,
    latent_channels: usize,
    vae_scale_factor: u32,
    scaling_factor: f32,
    shift_factor: f32,
    guidance_embedding_dim: Option<usize>,
    defaults: DiffusionDefaults,
}

#[derive(Clone, Debug)]
struct DiffusionDefaults {
    steps: u32,
    guidance: f32,
    width: u32,
    height: u32,
    negative_prompt: String,
}

impl DiffusionPipeline {
    pub fn load(bundle: &Bundle, options: LoadOptions) -> Result<Self> {
        let tokenizer = ClipTokenizer::from_dir(&bundle.path("tokenizer"))?;
        let scheduler_path = bundle.path("scheduler/scheduler_config.json");
        let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
        let unet_config: UnetConfig = read_json_or(
            &bundle.path("unet/config.json"),
            UnetConfig {
                in_channels: 4,
                sample_size: None,
                time_cond_proj_dim: None,
            },
        )?;
        let vae_config: VaeConfig = read_json_or(
            &bundle.path("vae_decoder/config.json"),
            VaeConfig {
                scaling_factor: default_scaling_factor(),
                shift_factor: None,
                block_out_channels: None,
                latent_channels: None,
            },
        )?;
        let text_encoder = Component::open(bundle.path("text_encoder/model.onnx"), &options)?;
        let unet = Component::open(bundle.path("unet/model.onnx"), &options)?;
        let vae_decoder = Component::open(bundle.path("vae_decoder/model.onnx"), &options)?;
        let unet_inputs = unet_inputs(&*unet.get()?)?;
        let guidance_embedding_dim =
            match (&unet_inputs.timestep_cond, unet_config.time_cond_proj_dim) {
                (Some(_), Some(dim)) => Some(dim),
                (Some(name), None) => bail!(
                    "{}: the UNet takes '{name}' but unet/config.json has no time_cond_proj_dim",
                    bundle.dir.display()
                ),
                (None, _) => None,
            };
        let default_scheduler = match &bundle.manifest.defaults.scheduler {
            Some(name) => name
                .parse()
                .map_err(|e| anyhow!("{}: defaults.scheduler: {e}", bundle.dir.display()))?,
            None => scheduler_config
                .default_kind()
                .unwrap_or(SchedulerKind::Euler),
        };
        let vae_scale_factor = vae_config
            .block_out_channels
            .as_ref()
            .map(|b| 1u32 << b.len().saturating_sub(1))
            .unwrap_or(8);
        let latent_channels = vae_config
            .latent_channels
            .unwrap_or(unet_config.in_channels);
        let native = unet_config
            .sample_size
            .map(|s| s as u32 * vae_scale_factor)
            .unwrap_or(512);
        let lcm = guidance_embedding_dim.is_some() || default_scheduler == SchedulerKind::Lcm;
        let manifest = &bundle.manifest.defaults;
        let defaults = DiffusionDefaults {
            steps: manifest.steps.unwrap_or(if lcm { 4 } else { 25 }),
            guidance: manifest.guidance.unwrap_or(if lcm { 8.5 } else { 7.5 }),
            width: manifest.width.unwrap_or(native),
            height: manifest.height.unwrap_or(native),
            negative_prompt: manifest.negative_prompt.clone().unwrap_or_default(),
        };
        Ok(DiffusionPipeline {
            id: bundle.id.clone(),
            tokenizer,
            text_encoder,
            unet,
            vae_decoder,
            unet_inputs,
            scheduler_config,
            default_scheduler,
            latent_channels,
            vae_scale_factor,
            scaling_factor: vae_config.scaling_factor,
            shift_factor: vae_config.shift_factor.unwrap_or(0.0),
            guidance_embedding_dim,
            defaults,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn default_scheduler(&self) -> SchedulerKind {
        self.default_scheduler
    }

    pub fn default_steps(&self) -> u32 {
        self.defaults.steps
    }

    pub fn default_size(&self) -> (u32, u32) {
        (self.defaults.width, self.defaults.height)
    }

    pub fn resolve(&self, request: &Request, limits: &Limits) -> Result<Settings, FieldError> {
        let batch = check_common(request, limits)?;
        if request.class.is_some() {
            return Err(FieldError::new("class", "only GAN models take a class"));
        }
        let prompt = request.prompt.clone().unwrap_or_default();
        let steps = request.steps.unwrap_or(self.defaults.steps);
        if steps == 0 || steps > limits.max_steps {
            return Err(FieldError::new(
                "steps",
                format!("{steps} is not between 1 and {}", limits.max_steps),
            ));
        }
        let guidance = request.guidance.unwrap_or(self.defaults.guidance);
        if !guidance.is_finite() || !(0.0..=30.0).contains(&guidance) {
            return Err(FieldError::new(
                "guidance",
                format!("{guidance} is not between 0 and 30"),
            ));
        }
        let width = request.width.unwrap_or(self.defaults.width);
        let height = request.height.unwrap_or(self.defaults.height);
        self.check_size("width", width)?;
        self.check_size("height", height)?;
        let pixels = u64::from(width) * u64::from(height) * u64::from(batch);
        if pixels > limits.max_pixels {
            return Err(FieldError::new(
                "width",
                format!(
                    "{width}x{height} (x{batch}) is {pixels} pixels, at most {} allowed",
                    limits.max_pixels
                ),
            ));
        }
        let scheduler = match &request.scheduler {
            Some(name) => name
                .parse::<SchedulerKind>()
                .map_err(|e| FieldError::new("scheduler", e.to_string()))?,
            None => self.default_scheduler,
        };
        Ok(Settings {
            prompt,
            negative_prompt: request
                .negative_prompt
                .clone()
                .unwrap_or_else(|| self.defaults.negative_prompt.clone()),
            steps,
            guidance,
            width,
            height,
            seed: request.seed.unwrap_or_else(random_seed),
            scheduler: Some(scheduler),
            class: None,
            batch,
        })
    }

    fn check_size(&self, field: &'static str, value: u32) -> Result<(), FieldError> {
        let multiple = 8.max(self.vae_scale_factor);
        if value == 0 || value % multiple != 0 {
            return Err(FieldError::new(
                field,
                format!("{value} is not a positive multiple of {multiple}"),
            ));
        }
        Ok(())
    }

    /// True when guidance runs as classifier-free guidance (two UNet passes a step).
    fn uses_cfg(&self, guidance: f32) -> bool {
        guidance > 1.0 && self.guidance_embedding_dim.is_none()
    }

    pub fn generate(&self, settings: &Settings, hook: StepHook) -> Result<Generated> {
        let started = Instant::now();
        let kind = settings.scheduler.unwrap_or(self.default_scheduler);
        let mut scheduler =
            scheduler::build(kind, &self.scheduler_config, settings.steps as usize)?;
        let batch = settings.batch as usize;
        let cfg = self.uses_cfg(settings.guidance);

        let text_started = Instant::now();
        let hidden_states = self.encode_prompts(settings, cfg)?;
        let text_encoder_ms = millis(text_started.elapsed());

        let mut rng = TorchGenerator::new(settings.seed);
        let latent_shape = [
            batch,
            self.latent_channels,
            (settings.height / self.vae_scale_factor) as usize,
            (settings.width / self.vae_scale_factor) as usize,
        ];
        let sigma = scheduler.init_noise_sigma() as f32;
        let mut latents = rng.randn(&latent_shape) * sigma;
        let timestep_cond = self.guidance_embedding_dim.map(|dim| {
            let row = guidance_embedding(settings.guidance - 1.0, dim);
            let rows: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
            ArrayD::from_shape_vec(IxDyn(&[batch, dim]), rows)
        });
        let timestep_cond = timestep_cond
            .transpose()
            .context("guidance embedding shape")?;

        let unet = self.unet.get()?;
        let unet_started = Instant::now();
        let timesteps = scheduler.timesteps().to_vec();
        for (index, &t) in timesteps.iter().enumerate() {
            if !hook(index, timesteps.len()) {
                return Err(anyhow::Error::new(Cancelled));
            }
            let model_input = if cfg {
                concatenate(Axis(0), &[latents.view(), latents.view()])?
            } else {
                latents.clone()
            };
            let model_input = scheduler.scale_model_input(model_input, index);
            let noise = self.unet_step(
                &unet,
                UnetStep {
                    sample: model_input,
                    timestep: t,
                    hidden_states: &hidden_states,
                    timestep_cond: timestep_cond.as_ref(),
                },
            )?;
            let noise = if cfg {
                apply_cfg(&noise, settings.guidance)?
            } else {
                noise
            };
            latents = scheduler.step(&noise, index, &latents, &mut rng);
        }
        drop(unet);
        let unet_ms = millis(unet_started.elapsed());

        let vae_started = Instant::now();
        let latents = latents.mapv(|v| v / self.scaling_factor + self.shift_factor);
        let vae = self.vae_decoder.get()?;
        let decoded = first_output(
            vae.run(vec![(first_input(&vae)?, Input::Float(latents))])?,
            &vae,
        )?;
        let vae_decoder_ms = millis(vae_started.elapsed());
        let pictures = picture::from_nchw(&decoded, [-1.0, 1.0])
            .with_context(|| format!("{}: decoder output", vae.path().display()))?;
        Ok(Generated {
            pictures,
            raw: decoded,
            timings: Timings {
                text_encoder_ms: Some(text_encoder_ms),
                unet_ms: Some(unet_ms),
                vae_decoder_ms: Some(vae_decoder_ms),
                generator_ms: None,
                total_ms: millis(started.elapsed()),
            },
        })
    }

    /// Prompt embeddings for the whole UNet batch: `[negative × batch, prompt × batch]`
    /// with CFG (diffusers' order), `[prompt × batch]` without.
    fn encode_prompts(&self, settings: &Settings, cfg: bool) -> Result<ArrayD<f32>> {
        let encoder = self.text_encoder.get()?;
        let mut prompts = Vec::new();
        if cfg {
            prompts.push(settings.negative_prompt.as_str());
        }
        prompts.push(settings.prompt.as_str());
        let mut rows = Vec::new();
        for prompt in prompts {
            let embedding = self.encode(&encoder, prompt)?;
            for _ in 0..settings.batch {
                rows.push(embedding.clone());
            }
        }
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        Ok(concatenate(Axis(0), &views)?)
    }

    fn encode(&self, encoder: &OnnxModel, prompt: &str) -> Result<ArrayD<f32>> {
        let ids = self.tokenizer.encode(prompt);
        let ids = ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids)?;
        let outputs = encoder.run(vec![(first_input(encoder)?, Input::Int(ids))])?;
        let index = encoder
            .outputs()
            .iter()
            .position(|n| n == "last_hidden_state")
            .unwrap_or(0);
        outputs.into_iter().nth(index).ok_or_else(|| {
            anyhow!(
                "{}: the text encoder has no output",
                encoder.path().display()
            )
        })
    }

    fn unet_step(&self, unet: &OnnxModel, step: UnetStep) -> Result<ArrayD<f32>> {
        let rows = step.sample.shape()[0];
        let timestep = ArrayD::from_elem(IxDyn(&[rows]), step.timestep as f32);
        let mut inputs = vec![
            (self.unet_inputs.sample.as_str(), Input::Float(step.sample)),
            (self.unet_inputs.timestep.as_str(), Input::Float(timestep)),
            (
                self.unet_inputs.hidden_states.as_str(),
                Input::Float(step.hidden_states.clone()),
            ),
        ];
        if let (Some(name), Some(cond)) = (&self.unet_inputs.timestep_cond, step.timestep_cond) {
            inputs.push((name.as_str(), Input::Float(cond.clone())));
        }
        first_output(unet.run(inputs)?, unet)
    }
}

struct UnetStep<'a> {
    sample: ArrayD<f32>,
    timestep: f64,
    hidden_states: &'a ArrayD<f32>,
    timestep_cond: Option<&'a ArrayD<f32>>,
}

fn unet_inputs(unet: &OnnxModel) -> Result<UnetInputs> {
    let need = |name: &str| -> Result<String> {
        unet.input(name).map(|s| s.name.clone()).ok_or_else(|| {
            let names: Vec<String> = unet.inputs().iter().map(|s| s.name.clone()).collect();
            anyhow!(
                "{}: the UNet has no input '{name}' (it has: {})",
                unet.path().display(),
                names.join(", ")
            )
        })
    };
    Ok(UnetInputs {
        sample: need("sample")?,
        timestep: need("timestep")?,
        hidden_states: need("encoder_hidden_states")?,
        timestep_cond: unet.input("timestep_cond").map(|s| s.name.clone()),
    })
}

fn first_input(model: &OnnxModel) -> Result<&str> {
    model
        .inputs()
        .first()
        .map(|s| s.name.as_str())
        .ok_or_else(|| anyhow!("{}: the graph has no inputs", model.path().display()))
}

fn first_output(outputs: Vec<ArrayD<f32>>, model: &OnnxModel) -> Result<ArrayD<f32>> {
    outputs
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{}: the graph has no outputs", model.path().display()))
}

/// `uncond + g · (text − uncond)` on a `[uncond; text]` batch.
fn apply_cfg(noise: &ArrayD<f32>, guidance: f32) -> Result<ArrayD<f32>> {
    let half = noise.shape()[0] / 2;
    if half * 2 != noise.shape()[0] {
        bail!(
            "UNet output batch {} is not even under guidance",
            noise.shape()[0]
        );
    }
    let uncond = noise.slice_axis(Axis(0), (0..half).into());
    let text = noise.slice_axis(Axis(0), (half..2 * half).into());
    Ok(&uncond + &((&text - &uncond) * guidance))
}

/// diffusers' `get_guidance_scale_embedding` for one guidance value `w`.
pub fn guidance_embedding(w: f32, dim: usize) -> Vec<f32> {
    let w = w * 1000.0;
    let half = dim / 2;
    let scale = (10000f32).ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -scale).exp()).collect();
    let mut embedding: Vec<f32> = freqs.iter().map(|f| (w * f).sin()).collect();
    embedding.extend(freqs.iter().map(|f| (w * f).cos()));
    if dim % 2 == 1 {
        embedding.push(0.0);
    }
    embedding
}
