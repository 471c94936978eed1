//! Stored pictures as the page's gallery, newest first, and the mapping
//! between a stored file `<output_dir>/<YYYY-MM-DD>/<id>.png` and its URL
//! `/images/<YYYY-MM-DD>/<id>.png`.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::daemon::intake;
use crate::storage;

/// One stored picture with the parameters that made it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct GalleryItem {
    /// The job id (shared by every picture of a batch).
    pub id: String,
    /// 0 for a job's first picture, 1… for the rest of a batch.
    pub index: u32,
    pub date: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub negative_prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Diffusion only (GANs have no steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The parts of a JSON sidecar (written by `generate::run_job`) the gallery shows.
#[derive(Deserialize)]
struct Sidecar {
    id: Option<String>,
    #[serde(default)]
    index: u32,
    model: Option<String>,
    #[serde(default)]
    settings: SidecarSettings,
    sha256: Option<String>,
    created: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct SidecarSettings {
    prompt: String,
    negative_prompt: String,
    steps: Option<u32>,
    guidance: Option<f32>,
    width: Option<u32>,
    height: Option<u32>,
    seed: Option<u64>,
    scheduler: Option<String>,
    class: Option<String>,
}

/// The `limit` newest stored pictures (by the time their sidecar was
/// written), newest first. Unreadable sidecars are skipped.
pub fn recent(output_dir: &Path, limit: usize) -> Result<Vec<GalleryItem>> {
    let mut items = Vec::new();
    for dir in storage::date_dirs(output_dir)?.into_iter().rev() {
        if items.len() >= limit {
            break;
        }
        let Some(date) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        for (stem, sidecar) in sidecars_newest_first(&dir)? {
            if items.len() >= limit {
                break;
            }
            match read_item(&sidecar, date, &stem) {
                Ok(item) => items.push(item),
                // Removed by retention meanwhile, or not one of ours.
                Err(err) => log::debug!("gallery: skipping {}: {err:#}", sidecar.display()),
            }
        }
    }
    Ok(items)
}

/// `(stem, path)` of each complete result in one date folder: a sidecar
/// named by a valid id, next to its PNG.
fn sidecars_newest_first(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut found: Vec<(SystemTime, String, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let stem = path
                .file_name()?
                .to_str()?
                .strip_suffix(".json")?
                .to_string();
            intake::check_id(&stem).ok()?;
            if !path.with_extension("png").is_file() {
                return None;
            }
            let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
            Some((modified, stem, path))
        })
        .collect();
    // Newest first; the name breaks ties so that the order is stable.
    found.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    Ok(found
        .into_iter()
        .map(|(_, stem, path)| (stem, path))
        .collect())
}

fn read_item(sidecar_path: &Path, date: &str, stem: &str) -> Result<GalleryItem> {
    let bytes =
        fs::read(sidecar_path).with_context(|| format!("reading {}", sidecar_path.display()))?;
    let sidecar: Sidecar = serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing {}", sidecar_path.display()))?;
    let settings = sidecar.settings;
    Ok(GalleryItem {
        id: sidecar.id.unwrap_or_else(|| stem.to_string()),
        index: sidecar.index,
        date: date.to_string(),
        url: url(date, stem),
        created: sidecar.created,
        model: sidecar.model,
        prompt: settings.prompt,
        negative_prompt: settings.negative_prompt,
        seed: settings.seed,
        steps: settings.scheduler.as_ref().and(settings.steps),
        guidance: settings.scheduler.as_ref().and(settings.guidance),
        scheduler: settings.scheduler,
        class: settings.class,
        width: settings.width,
        height: settings.height,
        sha256: sidecar.sha256,
    })
}

fn url(date: &str, stem: &str) -> String {
    format!("/images/{date}/{stem}.png")
}

/// The file behind `/images/{date}/{file}`, or the offending part and why.
/// Only a `YYYY-MM-DD` folder and an `<id>.png` name are accepted, so the
/// path cannot leave `output_dir`.
pub fn picture_path(
    output_dir: &Path,
    date: &str,
    file: &str,
) -> Result<PathBuf, (&'static str, String)> {
    if !storage::is_date_name(date) {
        return Err(("date", format!("'{date}' is not a YYYY-MM-DD date")));
    }
    let stem = file
        .strip_suffix(".png")
        .ok_or(("file", format!("'{file}' is not <id>.png")))?;
    intake::check_id(stem).map_err(|reason| ("id", reason))?;
    Ok(output_dir.join(date).join(file))
}

/// The URL of a stored picture, when `png` is a picture file under `output_dir`.
pub fn url_of(output_dir: &Path, png: &Path) -> Option<String> {
    let relative = png.strip_prefix(output_dir).ok()?;
    let mut parts = relative.components().map(|c| match c {
        Component::Normal(part) => part.to_str(),
        _ => None,
    });
    let (date, file) = (parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    picture_path(output_dir, date, file).ok()?;
    Some(format!("/images/{date}/{file}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picture_paths_accept_dates_and_ids_only() {
        let out = Path::new("/srv/images");
        assert_eq!(
            picture_path(out, "2026-01-02", "job_1-a.png").unwrap(),
            out.join("2026-01-02/job_1-a.png")
        );
        for (date, file, field) in [
            ("..", "a.png", "date"),
            ("2026-01-0x", "a.png", "date"),
            ("2026-01-02", "a.jpg", "file"),
            ("2026-01-02", "..png", "id"),
            ("2026-01-02", ".png", "id"),
            ("2026-01-02", "a b.png", "id"),
        ] {
            assert_eq!(
                picture_path(out, date, file).unwrap_err().0,
                field,
                "{date}/{file}"
            );
        }
    }

    #[test]
    fn urls_only_for_files_in_a_date_folder() {
        let out = Path::new("/srv/images");
        assert_eq!(
            url_of(out, &out.join("2026-01-02/j1.png")).as_deref(),
            Some("/images/2026-01-02/j1.png")
        );
        assert_eq!(url_of(out, Path::new("/elsewhere/2026-01-02/j1.png")), None);
        assert_eq!(url_of(out, &out.join("j1.png")), None);
        assert_eq!(url_of(out, &out.join("2026-01-02/x/j1.png")), None);
        assert_eq!(url_of(out, &out.join("2026-01-02/j1.json")), None);
    }

    #[test]
    fn lists_newest_first_with_parameters_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, sidecar: serde_json::Value| {
            let png = dir.path().join(rel);
            fs::create_dir_all(png.parent().unwrap()).unwrap();
            fs::write(&png, b"png").unwrap();
            fs::write(
                png.with_extension("json"),
                serde_json::to_vec(&sidecar).unwrap(),
            )
            .unwrap();
        };
        let settings = |prompt: &str| {
            serde_json::json!({"prompt": prompt, "negative_prompt": "", "seed": 7,
                "steps": 4, "guidance": 7.5, "width": 64, "height": 48, "scheduler": "euler"})
        };
        write(
            "2026-01-01/old.png",
            serde_json::json!({"id": "old", "model": "m", "settings": settings("old one")}),
        );
        write(
            "2026-01-02/new.png",
            serde_json::json!({"id": "new", "model": "m", "settings": settings("new one"), "sha256": "ab"}),
        );
        // Not listed: no PNG next to it, a name that is no id, a foreign folder.
        fs::write(dir.path().join("2026-01-02/lonely.json"), b"{}").unwrap();
        fs::write(dir.path().join("2026-01-02/.x.json"), b"{}").unwrap();
        fs::create_dir_all(dir.path().join("misc")).unwrap();
        fs::write(dir.path().join("misc/a.json"), b"{}").unwrap();
        fs::write(dir.path().join("misc/a.png"), b"png").unwrap();

        let items = recent(dir.path(), 10).unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["new", "old"]);
        let new = &items[0];
        assert_eq!(new.url, "/images/2026-01-02/new.png");
        assert_eq!(new.prompt, "new one");
        assert_eq!(
            (new.seed, new.steps, new.width, new.height),
            (Some(7), Some(4), Some(64), Some(48))
        );
        assert_eq!(new.sha256.as_deref(), Some("ab"));
        assert_eq!(recent(dir.path(), 1).unwrap().len(), 1);
        assert!(recent(&dir.path().join("missing"), 5).unwrap().is_empty());
    }
}
