//! Model bundles on disk: finding them, reading their manifests and
//! describing them (`edgegen models list|inspect`).

mod check;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use check::{onnx_inputs, GraphInput};

pub const MANIFEST: &str = "edgegen.toml";

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BundleKind {
    #[default]
    Diffusion,
    Gan,
}

impl fmt::Display for BundleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BundleKind::Diffusion => "diffusion",
            BundleKind::Gan => "gan",
        })
    }
}

/// Generation defaults a bundle may set; request fields override them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    pub steps: Option<u32>,
    pub guidance: Option<f32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub scheduler: Option<String>,
    pub negative_prompt: Option<String>,
}

/// `[gan]` table of a GAN bundle's manifest.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GanManifest {
    pub latent_input: String,
    pub latent_dim: usize,
    pub class_input: Option<String>,
    #[serde(default)]
    pub classes: Vec<String>,
    pub text_input: Option<String>,
    pub output: Option<String>,
    #[serde(default = "default_output_range")]
    pub output_range: [f32; 2],
    #[serde(default = "default_truncation")]
    pub truncation: f32,
}

fn default_output_range() -> [f32; 2] {
    [-1.0, 1.0]
}

fn default_truncation() -> f32 {
    1.0
}

/// The optional `edgegen.toml` of a bundle (required for GANs).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Manifest {
    pub kind: BundleKind,
    pub name: Option<String>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub defaults: Defaults,
    pub gan: Option<GanManifest>,
}

impl Manifest {
    pub fn from_toml(text: &str) -> Result<Manifest> {
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| anyhow!("{}", e.to_string().trim_end()))?;
        match (manifest.kind, &manifest.gan) {
            (BundleKind::Gan, None) => bail!("kind = \"gan\" needs a [gan] table"),
            (BundleKind::Diffusion, Some(_)) => bail!("a [gan] table needs kind = \"gan\""),
            _ => Ok(manifest),
        }
    }
}

/// A bundle directory whose manifest parsed and whose required files exist.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub id: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

const DIFFUSION_FILES: &[&str] = &[
    "text_encoder/model.onnx",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
];

const GAN_FILES: &[&str] = &["generator/model.onnx"];
const TEXT_FILES: &[&str] = &[
    "text_encoder/model.onnx",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
];

impl Bundle {
    pub fn open(dir: &Path) -> Result<Bundle> {
        if !dir.is_dir() {
            bail!("model bundle {}: no such directory", dir.display());
        }
        let id = bundle_id(dir)?;
        let manifest_path = dir.join(MANIFEST);
        let manifest = if manifest_path.is_file() {
            let text = std::fs::read_to_string(&manifest_path)
                .with_context(|| format!("cannot read {}", manifest_path.display()))?;
            Manifest::from_toml(&text).with_context(|| format!("in {}", manifest_path.display()))?
        } else {
            Manifest::default()
        };
        let bundle = Bundle {
            id,
            dir: dir.to_path_buf(),
            manifest,
        };
        bundle.check_files()?;
        Ok(bundle)
    }

    pub fn kind(&self) -> BundleKind {
        self.manifest.kind
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    fn required_files(&self) -> Vec<&'static str> {
        match &self.manifest.gan {
            None => DIFFUSION_FILES.to_vec(),
            Some(gan) if gan.text_input.is_some() => {
                GAN_FILES.iter().chain(TEXT_FILES).copied().collect()
            }
            Some(_) => GAN_FILES.to_vec(),
        }
    }

    fn check_files(&self) -> Result<()> {
        for file in self.required_files() {
            if !self.dir.join(file).is_file() {
                bail!("model bundle {}: missing {file}", self.dir.display());
            }
        }
        Ok(())
    }

    /// A quick integrity check beyond `open`: every ONNX file is a complete
    /// protobuf with a graph, the inputs the pipeline feeds are declared with
    /// the ranks it feeds them, and the tokenizer's vocabulary is JSON. Does
    /// not read the weights, so it stays fast for large models; loading the
    /// model checks the rest.
    pub fn check(&self) -> Result<()> {
        let component = |relative: &str| -> Result<Vec<GraphInput>> {
            check::onnx_inputs(&self.path(relative))
        };
        match &self.manifest.gan {
            None => {
                expect_first_rank(&component("text_encoder/model.onnx")?, 2, "text_encoder")?;
                let unet = component("unet/model.onnx")?;
                for (name, ranks) in [
                    ("sample", &[4][..]),
                    ("timestep", &[0, 1][..]),
                    ("encoder_hidden_states", &[3][..]),
                ] {
                    expect_input(&unet, name, ranks, "unet")?;
                }
                expect_first_rank(&component("vae_decoder/model.onnx")?, 4, "vae_decoder")?;
            }
            Some(gan) => {
                let generator = component("generator/model.onnx")?;
                let latent = expect_input(&generator, &gan.latent_input, &[2], "generator")?;
                if let Some(Some(dim)) = latent.dims.as_ref().and_then(|d| d.get(1)) {
                    if *dim > 0 && *dim as usize != gan.latent_dim {
                        bail!(
                            "generator/model.onnx: input '{}' takes {dim} latent values, but edgegen.toml says latent_dim = {}",
                            gan.latent_input,
                            gan.latent_dim
                        );
                    }
                }
                for name in [&gan.class_input, &gan.text_input].into_iter().flatten() {
                    expect_input(&generator, name, &[], "generator")?;
                }
                if gan.text_input.is_some() {
                    expect_first_rank(&component("text_encoder/model.onnx")?, 2, "text_encoder")?;
                }
            }
        }
        if self.required_files().contains(&"tokenizer/vocab.json") {
            let path = self.path("tokenizer/vocab.json");
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            serde_json::from_reader::<_, serde::de::IgnoredAny>(std::io::BufReader::new(file))
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
        }
        Ok(())
    }

    /// Total bytes of every file in the bundle.
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.dir)
    }

    pub fn display_name(&self) -> &str {
        self.manifest.name.as_deref().unwrap_or(&self.id)
    }
}

/// The input `name` of a component, with one of `ranks` when the graph declares
/// its shape (any rank when `ranks` is empty).
fn expect_input<'a>(
    inputs: &'a [GraphInput],
    name: &str,
    ranks: &[usize],
    component: &str,
) -> Result<&'a GraphInput> {
    let Some(input) = inputs.iter().find(|i| i.name == name) else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        bail!(
            "{component}/model.onnx has no input '{name}' (it has: {})",
            names.join(", ")
        );
    };
    check_rank(input, ranks, component)?;
    Ok(input)
}

fn expect_first_rank(inputs: &[GraphInput], rank: usize, component: &str) -> Result<()> {
    let input = inputs
        .first()
        .ok_or_else(|| anyhow!("{component}/model.onnx: the graph has no inputs"))?;
    check_rank(input, &[rank], component)
}

fn check_rank(input: &GraphInput, ranks: &[usize], component: &str) -> Result<()> {
    match input.rank() {
        Some(rank) if !ranks.is_empty() && !ranks.contains(&rank) => bail!(
            "{component}/model.onnx: input '{}' has {rank} dimensions, the pipeline feeds it {}",
            input.name,
            ranks
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        ),
        _ => Ok(()),
    }
}

fn bundle_id(dir: &Path) -> Result<String> {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow!(
                "model bundle {}: directory name is not UTF-8",
                dir.display()
            )
        })
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// One entry of the models directory: a usable bundle or the reason it is not.
#[derive(Debug)]
pub struct Listed {
    pub id: String,
    pub dir: PathBuf,
    pub bundle: Result<Bundle, String>,
}

/// Every sub-directory of `models_dir`, sorted by id, each checked with `Bundle::check`.
pub fn list(models_dir: &Path) -> Result<Vec<Listed>> {
    let entries = std::fs::read_dir(models_dir)
        .with_context(|| format!("cannot read models directory {}", models_dir.display()))?;
    let mut listed: Vec<Listed> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| {
            let dir = e.path();
            let id = e.file_name().to_string_lossy().into_owned();
            let bundle = Bundle::open(&dir)
                .and_then(|b| b.check().map(|()| b))
                .map_err(|err| format!("{err:#}"));
            Listed { id, dir, bundle }
        })
        .collect();
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(listed)
}

/// A model named by id (a directory under `models_dir`) or by a path to a bundle.
pub fn resolve(models_dir: &Path, name: &str) -> Result<Bundle> {
    let as_path = Path::new(name);
    if name.contains('/') || name.contains(std::path::MAIN_SEPARATOR) || as_path.is_absolute() {
        return Bundle::open(as_path);
    }
    if !is_valid_id(name) {
        bail!("model id '{name}' is not valid (letters, digits, '-', '_', '.')");
    }
    let dir = models_dir.join(name);
    if !dir.is_dir() {
        let known: Vec<String> = list(models_dir)
            .map(|l| l.into_iter().map(|e| e.id).collect())
            .unwrap_or_default();
        bail!(
            "unknown model '{name}' in {} (installed: {})",
            models_dir.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    Bundle::open(&dir)
}

pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gan_manifest_parses() {
        let text = r#"
kind = "gan"
[gan]
latent_input = "z"
latent_dim = 16
class_input = "class_label"
classes = ["apple", "tree"]
output = "image"
output_range = [-1.0, 1.0]
truncation = 0.7
"#;
        let m = Manifest::from_toml(text).unwrap();
        let gan = m.gan.unwrap();
        assert_eq!(gan.latent_dim, 16);
        assert_eq!(gan.classes, vec!["apple", "tree"]);
        assert_eq!(gan.truncation, 0.7);
    }

    #[test]
    fn manifest_unknown_key_is_named() {
        let err = Manifest::from_toml("[defaults]\nstepz = 3\n").unwrap_err();
        assert!(format!("{err:#}").contains("stepz"), "{err:#}");
    }

    #[test]
    fn gan_kind_needs_table() {
        assert!(Manifest::from_toml("kind = \"gan\"\n").is_err());
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("tiny-sd_1.5"));
        assert!(!is_valid_id("../x"));
        assert!(!is_valid_id(".hidden"));
        assert!(!is_valid_id(""));
    }
}
