//! Typed configuration: `edgegen.toml`, then `EDGEGEN_*` environment
//! variables, then command-line flags. Every key has a default.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::MatrixPath;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub models: ModelsConfig,
    pub engine: EngineConfig,
    pub mqtt: MqttConfig,
    pub limits: Limits,
    pub kiosk: KioskConfig,
    pub storage: StorageConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    pub dir: PathBuf,
    pub default: String,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: "models".into(),
            default: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    #[default]
    Resident,
    Sequential,
}

/// `engine.matmul`: which kernels run convolutions and large matrix products.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MatMulSetting {
    /// The measured default of this architecture (gemm on x86_64, tract elsewhere).
    #[default]
    Auto,
    Gemm,
    Tract,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub threads: usize,
    pub memory: MemoryMode,
    pub cache_dir: PathBuf,
    /// Bound on the compile cache's size in MiB; the least recently used
    /// plans are deleted beyond it. 0 = unbounded.
    pub cache_max_mb: u64,
    /// Largest attention score tensor computed whole, in MiB; larger ones run
    /// in slices of query rows. 0 computes every one whole.
    pub attention_slice_mb: usize,
    pub matmul: MatMulSetting,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: 0,
            memory: MemoryMode::default(),
            cache_dir: PathBuf::new(),
            cache_max_mb: 0,
            attention_slice_mb: crate::engine::DEFAULT_ATTENTION_SLICE_BYTES >> 20,
            matmul: MatMulSetting::Auto,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    pub broker: String,
    pub listen: String,
    pub prefix: String,
    pub node_id: String,
    pub client_id: String,
    pub username: String,
    pub password_file: PathBuf,
    pub ca_file: PathBuf,
    pub shared_group: String,
    pub home_assistant: bool,
    /// Topic filter every `reply_to` and MQTT 5 response topic must match;
    /// empty means `<prefix>/reply/#`. Keeps a client from making the daemon
    /// publish where the client itself may not.
    pub reply_filter: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            broker: "embedded".into(),
            listen: "127.0.0.1:1883".into(),
            prefix: "edgegen".into(),
            node_id: String::new(),
            client_id: String::new(),
            username: String::new(),
            password_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            shared_group: String::new(),
            home_assistant: false,
            reply_filter: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub queue: usize,
    pub max_steps: u32,
    pub max_pixels: u64,
    pub max_payload_bytes: usize,
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue: 16,
            max_steps: 50,
            max_pixels: 262_144,
            max_payload_bytes: 65_536,
            max_prompt_chars: 1000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KioskConfig {
    pub enabled: bool,
    pub listen: String,
}

impl Default for KioskConfig {
    fn default() -> Self {
        KioskConfig {
            enabled: false,
            listen: "127.0.0.1:8080".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub output_dir: PathBuf,
    pub state_dir: PathBuf,
    pub max_bytes: u64,
    pub max_age_days: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            output_dir: "images".into(),
            state_dir: "state".into(),
            max_bytes: 0,
            max_age_days: 0,
        }
    }
}

impl Config {
    /// Where compiled graphs are kept: `engine.cache_dir`, `<state_dir>/cache`
    /// when that is empty, none when it is `off`.
    pub fn compile_cache_dir(&self) -> Option<PathBuf> {
        let dir = &self.engine.cache_dir;
        if dir.as_os_str() == "off" {
            None
        } else if dir.as_os_str().is_empty() {
            Some(self.storage.state_dir.join("cache"))
        } else {
            Some(dir.clone())
        }
    }

    /// `engine.cache_max_mb` in bytes; `None` when the cache is unbounded.
    pub fn compile_cache_max_bytes(&self) -> Option<u64> {
        (self.engine.cache_max_mb > 0).then_some(self.engine.cache_max_mb << 20)
    }

    /// `engine.matmul` resolved for this CPU.
    pub fn matrix_path(&self) -> MatrixPath {
        match self.engine.matmul {
            MatMulSetting::Auto => MatrixPath::for_this_cpu(),
            MatMulSetting::Gemm => MatrixPath::Gemm,
            MatMulSetting::Tract => MatrixPath::Tract,
        }
    }

    /// `engine.attention_slice_mb` in bytes; `None` when slicing is off.
    pub fn attention_slice_bytes(&self) -> Option<usize> {
        match self.engine.attention_slice_mb {
            0 => None,
            mb => Some(mb.saturating_mul(1 << 20)),
        }
    }

    /// Reads a config file; unknown keys and wrong types are errors naming the key.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Config::from_toml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| anyhow!("{}", e.to_string().trim_end()))
    }

    /// Loads the given file, or `config/edgegen.toml` when it exists, or the defaults;
    /// then applies `EDGEGEN_<SECTION>_<KEY>` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let mut config = match path {
            Some(path) => Config::from_file(path)?,
            None => {
                let default = Path::new("config/edgegen.toml");
                if default.is_file() {
                    Config::from_file(default)?
                } else {
                    Config::default()
                }
            }
        };
        config.apply_env(std::env::vars())?;
        Ok(config)
    }

    /// `EDGEGEN_MQTT_BROKER=mqtt://host:1883` sets `mqtt.broker`, and so on for every key.
    pub fn apply_env(&mut self, vars: impl Iterator<Item = (String, String)>) -> Result<()> {
        let mut table = toml::Table::try_from(&*self).context("serializing config")?;
        let mut changed = false;
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("EDGEGEN_") else {
                continue;
            };
            if rest == "LOG" {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            let Some((section, key)) = lower.split_once('_') else {
                bail!("environment variable {name}: expected EDGEGEN_<SECTION>_<KEY>");
            };
            let Some(toml::Value::Table(section_table)) = table.get_mut(section) else {
                bail!("environment variable {name}: unknown section '{section}'");
            };
            let Some(current) = section_table.get(key) else {
                bail!("environment variable {name}: unknown key '{section}.{key}'");
            };
            let parsed = parse_like(current, &value)
                .with_context(|| format!("environment variable {name}"))?;
            section_table.insert(key.to_string(), parsed);
            changed = true;
        }
        if changed {
            *self = table
                .try_into()
                .map_err(|e: toml::de::Error| anyhow!("{e}"))?;
        }
        Ok(())
    }
}

fn parse_like(current: &toml::Value, text: &str) -> Result<toml::Value> {
    Ok(match current {
        toml::Value::Integer(_) => toml::Value::Integer(
            text.parse()
                .map_err(|_| anyhow!("expected an integer, got '{text}'"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(
            text.parse()
                .map_err(|_| anyhow!("expected true or false, got '{text}'"))?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            text.parse()
                .map_err(|_| anyhow!("expected a number, got '{text}'"))?,
        ),
        _ => toml::Value::String(text.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn compile_cache_lives_under_the_state_dir_unless_told() {
        let mut config = Config::from_toml("[storage]\nstate_dir = \"/var/lib/edgegen\"").unwrap();
        assert_eq!(
            config.compile_cache_dir(),
            Some(PathBuf::from("/var/lib/edgegen/cache"))
        );
        config.engine.cache_dir = "/tmp/plans".into();
        assert_eq!(
            config.compile_cache_dir(),
            Some(PathBuf::from("/tmp/plans"))
        );
        config.engine.cache_dir = "off".into();
        assert_eq!(config.compile_cache_dir(), None);
    }

    #[test]
    fn attention_slicing_is_on_unless_zero() {
        let config = Config::default();
        assert_eq!(config.attention_slice_bytes(), Some(32 << 20));
        let config = Config::from_toml("[engine]\nattention_slice_mb = 0").unwrap();
        assert_eq!(config.attention_slice_bytes(), None);
        let config = Config::from_toml("[engine]\nattention_slice_mb = 8").unwrap();
        assert_eq!(config.attention_slice_bytes(), Some(8 << 20));
    }

    #[test]
    fn the_compile_cache_is_unbounded_unless_given_a_size() {
        assert_eq!(Config::default().compile_cache_max_bytes(), None);
        let config = Config::from_toml("[engine]\ncache_max_mb = 0").unwrap();
        assert_eq!(config.compile_cache_max_bytes(), None);
        let config = Config::from_toml("[engine]\ncache_max_mb = 4096").unwrap();
        assert_eq!(config.compile_cache_max_bytes(), Some(4096 << 20));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[limits]\nqueue = 3\nmax_stepz = 4\n").unwrap_err();
        assert!(format!("{err:#}").contains("max_stepz"), "{err:#}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("[engine]\nthreads = \"many\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("threads"), "{err:#}");
    }

    #[test]
    fn env_overrides_keys() {
        let mut config = Config::default();
        let vars = vec![
            ("EDGEGEN_LIMITS_QUEUE".to_string(), "3".to_string()),
            ("EDGEGEN_MQTT_BROKER".to_string(), "mqtt://h:1".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        config.apply_env(vars.into_iter()).unwrap();
        assert_eq!(config.limits.queue, 3);
        assert_eq!(config.mqtt.broker, "mqtt://h:1");
    }

    #[test]
    fn env_unknown_key_is_named() {
        let mut config = Config::default();
        let vars = vec![("EDGEGEN_LIMITS_QUEUEZ".to_string(), "3".to_string())];
        let err = config.apply_env(vars.into_iter()).unwrap_err();
        assert!(format!("{err:#}").contains("limits.queuez"), "{err:#}");
    }
}
