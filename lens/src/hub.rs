//! Pretrained tuned lenses from the hub: tuned-lens's own, kept in the Hugging Face Space
//! `AlignmentResearch/tuned-lens` as `lens/<model id>/config.json` + `params.pt` (Pythia
//! deduped models, GPT-NeoX-20B, Llama 2 and others; final checkpoints only). As tuned-lens
//! does, `TUNED_LENS_REPO_ID` and `TUNED_LENS_REPO_TYPE` (`space`, `model` or `dataset`)
//! point elsewhere; `HF_HOME`, `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply as for
//! models.

use std::path::{Path, PathBuf};

use hooks::source::RepoType;
use hooks::Model;

use crate::{Error, Result, TunedLens};

/// Where tuned-lens keeps its pretrained lenses.
pub const PRETRAINED_LENS_REPO: &str = "AlignmentResearch/tuned-lens";

/// The hub repository that holds pretrained lenses (`lens/<model id>/`).
#[derive(Debug, Clone)]
pub struct LensRepo {
    /// `owner/name`.
    pub repo_id: String,
    /// A Space, a model or a dataset repository.
    pub kind: RepoType,
    /// Branch, tag or commit.
    pub revision: String,
}

impl LensRepo {
    /// `repo_id` and `repo_type` (a type as tuned-lens names it: `space`, `model` or
    /// `dataset`) where given, else `TUNED_LENS_REPO_ID` / `TUNED_LENS_REPO_TYPE` (unset or
    /// empty: tuned-lens's collection, as tuned-lens reads them).
    pub fn new(repo_id: Option<String>, repo_type: Option<&str>, revision: &str) -> Result<Self> {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let kind = match repo_type {
            Some(given) => repo_kind(given, "repo_type")?,
            None => match var("TUNED_LENS_REPO_TYPE") {
                Some(set) => repo_kind(&set, "TUNED_LENS_REPO_TYPE")?,
                None => RepoType::Space,
            },
        };
        Ok(LensRepo {
            repo_id: repo_id
                .or_else(|| var("TUNED_LENS_REPO_ID"))
                .unwrap_or_else(|| PRETRAINED_LENS_REPO.into()),
            kind,
            revision: revision.into(),
        })
    }
}

/// A repository type as tuned-lens names it; `source` says where the name came from.
fn repo_kind(name: &str, source: &str) -> Result<RepoType> {
    match name {
        "space" => Ok(RepoType::Space),
        "model" => Ok(RepoType::Model),
        "dataset" => Ok(RepoType::Dataset),
        other => Err(Error::Lens(format!(
            "{source} '{other}' is not space, model or dataset"
        ))),
    }
}

/// The lens files of `resource_id` (a model's hub id, e.g. `EleutherAI/pythia-160m-deduped`)
/// in `repo`, fetched into the Hugging Face cache: tuned-lens's `params.pt`, or the
/// `params.safetensors` our own `save` writes. Returns the lens's folder.
pub fn fetch_pretrained(resource_id: &str, repo: &LensRepo) -> Result<PathBuf> {
    if resource_id.is_empty() {
        return Err(Error::Lens(
            "name the model whose pretrained lens to use (pretrained:EleutherAI/pythia-160m-deduped)"
                .into(),
        ));
    }
    let folder = format!("lens/{resource_id}");
    let mut first_error = None;
    for params in ["params.pt", "params.safetensors"] {
        let names = ["config.json", params].map(|file| format!("{folder}/{file}"));
        match hooks::source::hub_files_in(repo.kind, &repo.repo_id, &repo.revision, &names) {
            Ok(paths) => {
                return paths[0].parent().map(Path::to_path_buf).ok_or_else(|| {
                    Error::Lens(format!("unexpected cache path {}", paths[0].display()))
                })
            }
            Err(hooks::Error::NotOnHub { missing, .. }) if missing.contains(&names[0]) => {
                return Err(no_such_lens(resource_id, repo));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.expect("one error per parameter file").into())
}

/// The error for a lens the repository does not hold, with the lenses it does hold (and the
/// deduped model's, which tuned-lens's collection has for Pythia, when there is one).
fn no_such_lens(resource_id: &str, repo: &LensRepo) -> Error {
    let listing = hooks::source::hub_listing(
        repo.kind,
        &repo.repo_id,
        &repo.revision,
        "to list its lenses",
    );
    let mut available: Vec<String> = listing
        .map(|l| {
            l.files
                .iter()
                .filter_map(|f| f.strip_prefix("lens/")?.strip_suffix("/config.json"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    available.sort();
    let deduped = format!("{resource_id}-deduped");
    let hint = if available.contains(&deduped) {
        format!("; {deduped} (the model trained on the deduplicated Pile) has one")
    } else {
        String::new()
    };
    Error::Lens(format!(
        "{} has no pretrained lens for '{resource_id}'{hint}; it has lenses for: {}",
        repo.repo_id,
        if available.is_empty() {
            "(none found)".to_string()
        } else {
            available.join(", ")
        }
    ))
}

/// The pretrained lens for `model`, checked against the model: `resource_id` is a lens
/// folder, or the model id whose lens `repo` holds (default: the model's own hub id).
pub fn load_pretrained(
    model: &Model,
    resource_id: Option<&str>,
    repo: &LensRepo,
) -> Result<TunedLens> {
    let resource_id = match resource_id {
        Some(id) => id,
        None => hub_id(model).ok_or_else(|| {
            Error::Lens(format!(
                "model '{}' is not from the hub: name the model id whose pretrained lens to use \
                 (pretrained:<id> on the command line, lens_resource_id in Python)",
                model.origin()
            ))
        })?,
    };
    let local = Path::new(resource_id);
    let lens_files = ["params.pt", "params.safetensors"];
    let folder = if local.join("config.json").is_file()
        && lens_files.iter().any(|f| local.join(f).is_file())
    {
        local.to_path_buf()
    } else if !hooks::source::is_hub_id(resource_id) {
        return Err(Error::Lens(format!(
            "'{resource_id}' is neither a lens folder (config.json and params.pt or \
             params.safetensors) nor a model id"
        )));
    } else {
        if let Some(revision) = model.revision().filter(|r| *r != "main") {
            tracing::warn!(
                "the pretrained lens of {resource_id} was trained on the model's final weights, \
                 and this model is at revision '{revision}'"
            );
        }
        fetch_pretrained(resource_id, repo)?
    };
    let lens = TunedLens::load(&folder, model.device())?;
    lens.check_model(model)?;
    Ok(lens)
}

/// A lens named on a command line: `logit` (none: the logit lens), `pretrained` (the model's
/// lens from tuned-lens's hub collection), `pretrained:<model id>`, or a lens folder (a
/// folder named `pretrained` as `./pretrained`).
pub fn lens_named(name: &str, model: &Model) -> Result<Option<TunedLens>> {
    let lens = if name == "logit" {
        return Ok(None);
    } else if name == "pretrained" {
        load_pretrained(model, None, &LensRepo::new(None, None, "main")?)?
    } else if let Some(id) = name.strip_prefix("pretrained:") {
        load_pretrained(model, Some(id), &LensRepo::new(None, None, "main")?)?
    } else {
        let lens = TunedLens::load(Path::new(name), model.device())?;
        lens.check_model(model)?;
        lens
    };
    Ok(Some(lens))
}

/// The hub id of a model loaded from the hub (its origin is `<id>@<revision>`).
fn hub_id(model: &Model) -> Option<&str> {
    let origin = model.origin();
    let (id, _) = origin.rsplit_once('@')?;
    (hooks::source::is_hub_id(id) && !Path::new(origin).exists()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_named_as_tuned_lens_names_them() {
        let repo = LensRepo::new(Some("org/lenses".into()), Some("model"), "v1").unwrap();
        assert_eq!(repo.repo_id, "org/lenses");
        assert!(matches!(repo.kind, RepoType::Model));
        assert_eq!(repo.revision, "v1");
        let err = LensRepo::new(None, Some("bucket"), "main")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("repo_type 'bucket' is not space, model or dataset"),
            "{err}"
        );
        let err = fetch_pretrained("", &repo).unwrap_err().to_string();
        assert!(err.contains("name the model"), "{err}");
    }
}
