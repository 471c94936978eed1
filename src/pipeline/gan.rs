//! GAN generators: one forward pass from a seeded latent, optionally
//! conditioned on a class label or on a text embedding.

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use ndarray::{ArrayD, IxDyn};

use super::{
    check_common, millis, Cancelled, Component, Generated, LoadOptions, StepHook, Timings,
};
use crate::bundle::{Bundle, GanManifest};
use crate::config::Limits;
use crate::engine::{Input, OnnxModel};
use crate::picture;
use crate::request::{random_seed, FieldError, Request, Settings};
use crate::rng::TorchGenerator;
use crate::tokenizer::ClipTokenizer;

struct TextConditioning {
    tokenizer: ClipTokenizer,
    encoder: Component,
    input: String,
}

pub struct GanPipeline {
    id: String,
    manifest: GanManifest,
    generator: Component,
    text: Option<TextConditioning>,
    size: (u32, u32),
}

impl GanPipeline {
    pub fn load(bundle: &Bundle, options: LoadOptions) -> Result<Self> {
        let manifest =
            bundle.manifest.gan.clone().ok_or_else(|| {
                anyhow!("{}: no [gan] table in edgegen.toml", bundle.dir.display())
            })?;
        let generator = Component::open(bundle.path("generator/model.onnx"), &options)?;
        let text = match &manifest.text_input {
            Some(input) => Some(TextConditioning {
                tokenizer: ClipTokenizer::from_dir(&bundle.path("tokenizer"))?,
                encoder: Component::open(bundle.path("text_encoder/model.onnx"), &options)?,
                input: input.clone(),
            }),
            None => None,
        };
        let model = generator.get()?;
        check_inputs(&model, &manifest)?;
        let mut pipeline = GanPipeline {
            id: bundle.id.clone(),
            manifest,
            generator,
            text,
            size: (0, 0),
        };
        pipeline.size = pipeline.probe_size(&model)?;
        Ok(pipeline)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn classes(&self) -> &[String] {
        &self.manifest.classes
    }

    /// Width and height of the generated pictures.
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// Runs the generator once on a zero latent to learn its output size.
    fn probe_size(&self, model: &OnnxModel) -> Result<(u32, u32)> {
        let settings = Settings {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 1,
            guidance: 0.0,
            width: 0,
            height: 0,
            seed: 0,
            scheduler: None,
            class: self.manifest.classes.first().cloned(),
            batch: 1,
        };
        let z = ArrayD::zeros(IxDyn(&[1, self.manifest.latent_dim]));
        let output = self.run(model, &settings, z)?;
        let shape = output.shape();
        if shape.len() != 4 || shape[1] != 3 {
            return Err(anyhow!(
                "{}: output must be [batch, 3, height, width], got {shape:?}",
                model.path().display()
            ));
        }
        Ok((shape[3] as u32, shape[2] as u32))
    }

    pub fn resolve(&self, request: &Request, limits: &Limits) -> Result<Settings, FieldError> {
        let batch = check_common(request, limits)?;
        let not_for_gan = "a GAN makes a picture in one pass and takes no";
        if request.steps.is_some() {
            return Err(FieldError::new("steps", format!("{not_for_gan} steps")));
        }
        if request.guidance.is_some() {
            return Err(FieldError::new(
                "guidance",
                format!("{not_for_gan} guidance"),
            ));
        }
        if request.scheduler.is_some() {
            return Err(FieldError::new(
                "scheduler",
                format!("{not_for_gan} scheduler"),
            ));
        }
        if request
            .negative_prompt
            .as_deref()
            .is_some_and(|n| !n.is_empty())
        {
            return Err(FieldError::new(
                "negative_prompt",
                "GAN models take no negative prompt",
            ));
        }
        let (width, height) = self.size;
        for (field, given, size) in [
            ("width", request.width, width),
            ("height", request.height, height),
        ] {
            if given.is_some_and(|g| g != size) {
                return Err(FieldError::new(
                    field,
                    format!("this GAN makes {width}x{height} pictures only"),
                ));
            }
        }
        let pixels = u64::from(width) * u64::from(height) * u64::from(batch);
        if pixels > limits.max_pixels {
            return Err(FieldError::new(
                "batch",
                format!("{pixels} pixels, at most {} allowed", limits.max_pixels),
            ));
        }
        let prompt = request.prompt.clone().unwrap_or_default();
        let class = self.pick_class(request.class.as_deref(), &prompt)?;
        Ok(Settings {
            prompt,
            negative_prompt: String::new(),
            steps: 1,
            guidance: 0.0,
            width,
            height,
            seed: request.seed.unwrap_or_else(random_seed),
            scheduler: None,
            class,
            batch,
        })
    }

    fn class_list(&self) -> String {
        self.manifest.classes.join(", ")
    }

    /// The class named by `class`, or else the one class the prompt names.
    fn pick_class(&self, class: Option<&str>, prompt: &str) -> Result<Option<String>, FieldError> {
        if self.manifest.class_input.is_none() {
            return match class {
                Some(_) => Err(FieldError::new("class", "this model takes no class")),
                None => Ok(None),
            };
        }
        if let Some(class) = class {
            return match self
                .manifest
                .classes
                .iter()
                .find(|c| c.eq_ignore_ascii_case(class.trim()))
            {
                Some(found) => Ok(Some(found.clone())),
                None => Err(FieldError::new(
                    "class",
                    format!("unknown class '{class}'; classes: {}", self.class_list()),
                )),
            };
        }
        let named = classes_named_in(&self.manifest.classes, prompt);
        match named.as_slice() {
            [one] => Ok(Some(one.clone())),
            [] => Err(FieldError::new(
                "prompt",
                format!("names no class; classes: {}", self.class_list()),
            )),
            several => Err(FieldError::new(
                "prompt",
                format!(
                    "names several classes ({}); name one of: {}",
                    several.join(", "),
                    self.class_list()
                ),
            )),
        }
    }

    pub fn generate(&self, settings: &Settings, hook: StepHook) -> Result<Generated> {
        let started = Instant::now();
        if !hook(0, 1) {
            return Err(anyhow::Error::new(Cancelled));
        }
        let mut rng = TorchGenerator::new(settings.seed);
        let z = rng.randn(&[settings.batch as usize, self.manifest.latent_dim])
            * self.manifest.truncation;
        let model = self.generator.get()?;
        let output = self.run(&model, settings, z)?;
        let pictures = picture::from_nchw(&output, self.manifest.output_range)
            .with_context(|| format!("{}: generator output", model.path().display()))?;
        let total_ms = millis(started.elapsed());
        Ok(Generated {
            pictures,
            raw: output,
            timings: Timings {
                generator_ms: Some(total_ms),
                total_ms,
                ..Timings::default()
            },
        })
    }

    fn run(&self, model: &OnnxModel, settings: &Settings, z: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let batch = z.shape()[0];
        let mut inputs = vec![(self.manifest.latent_input.as_str(), Input::Float(z))];
        if let Some(name) = &self.manifest.class_input {
            let class = settings.class.as_deref().unwrap_or_default();
            let index = self
                .manifest
                .classes
                .iter()
                .position(|c| c == class)
                .ok_or_else(|| {
                    anyhow!("unknown class '{class}'; classes: {}", self.class_list())
                })?;
            inputs.push((
                name.as_str(),
                Input::Int(ArrayD::from_elem(IxDyn(&[batch]), index as i64)),
            ));
        }
        if let Some(text) = &self.text {
            let embedding = text.embed(&settings.prompt, batch, model)?;
            inputs.push((text.input.as_str(), Input::Float(embedding)));
        }
        let outputs = model.run(inputs)?;
        let index = match &self.manifest.output {
            Some(name) => model
                .outputs()
                .iter()
                .position(|o| o == name)
                .ok_or_else(|| {
                    anyhow!(
                        "{}: no output '{name}' (outputs: {})",
                        model.path().display(),
                        model.outputs().join(", ")
                    )
                })?,
            None => 0,
        };
        outputs
            .into_iter()
            .nth(index)
            .ok_or_else(|| anyhow!("{}: the generator has no output", model.path().display()))
    }
}

impl TextConditioning {
    /// The text embedding in the form the generator declares: rank 3 takes the
    /// encoder's hidden states, rank 2 its pooled output.
    fn embed(&self, prompt: &str, batch: usize, generator: &OnnxModel) -> Result<ArrayD<f32>> {
        let encoder = self.encoder.get()?;
        let ids = self.tokenizer.encode(prompt);
        let ids = ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids)?;
        let input = encoder
            .inputs()
            .first()
            .map(|s| s.name.clone())
            .ok_or_else(|| anyhow!("{}: no inputs", encoder.path().display()))?;
        let outputs = encoder.run(vec![(input.as_str(), Input::Int(ids))])?;
        let rank = generator
            .input(&self.input)
            .and_then(|s| s.rank())
            .unwrap_or(3);
        let wanted = if rank == 2 {
            "pooler_output"
        } else {
            "last_hidden_state"
        };
        let index = encoder
            .outputs()
            .iter()
            .position(|n| n == wanted)
            .unwrap_or(0);
        let one = outputs
            .into_iter()
            .nth(index)
            .ok_or_else(|| anyhow!("{}: no output '{wanted}'", encoder.path().display()))?;
        let views: Vec<_> = (0..batch).map(|_| one.view()).collect();
        Ok(ndarray::concatenate(ndarray::Axis(0), &views)?)
    }
}

fn check_inputs(model: &OnnxModel, manifest: &GanManifest) -> Result<()> {
    let names = [
        Some(&manifest.latent_input),
        manifest.class_input.as_ref(),
        manifest.text_input.as_ref(),
    ];
    for name in names.into_iter().flatten() {
        if model.input(name).is_none() {
            let inputs: Vec<String> = model.inputs().iter().map(|s| s.name.clone()).collect();
            return Err(anyhow!(
                "{}: edgegen.toml names input '{name}' but the graph's inputs are: {}",
                model.path().display(),
                inputs.join(", ")
            ));
        }
    }
    Ok(())
}

/// Classes whose name appears in the prompt as whole words (longest names win,
/// so "red apple" is not also counted as "apple").
fn classes_named_in(classes: &[String], prompt: &str) -> Vec<String> {
    let mut text = format!(" {} ", normalize(prompt));
    let mut by_length: Vec<&String> = classes.iter().collect();
    by_length.sort_by_key(|c| std::cmp::Reverse(c.len()));
    let mut found = Vec::new();
    for class in by_length {
        let needle = format!(" {} ", normalize(class));
        if text.contains(&needle) {
            found.push(class.clone());
            text = text.replace(&needle, " ");
        }
    }
    found
}

fn normalize(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    lowered.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_names_classes() {
        let classes: Vec<String> = ["apple", "red apple", "tree"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            classes_named_in(&classes, "A red apple."),
            vec!["red apple"]
        );
        assert_eq!(classes_named_in(&classes, "an apple and a tree").len(), 2);
        assert!(classes_named_in(&classes, "pineapples").is_empty());
    }
}
