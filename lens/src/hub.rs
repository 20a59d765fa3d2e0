//! Pretrained tuned lenses from the hub: tuned-lens's own, kept in the Hugging Face Space
//! `AlignmentResearch/tuned-lens` as `lens/<model id>/config.json` + `params.pt` (Pythia
//! deduped models, GPT-2, Llama 2 and others, final checkpoints only). As tuned-lens does,
//! `TUNED_LENS_REPO_ID` and `TUNED_LENS_REPO_TYPE` (`space`, `model` or `dataset`) point
//! elsewhere; `HF_HOME`, `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply as for models.

use std::path::{Path, PathBuf};

use hooks::source::RepoType;
use hooks::Model;

use crate::{Error, Result, TunedLens};

/// Where tuned-lens keeps its pretrained lenses.
pub const PRETRAINED_LENS_REPO: &str = "AlignmentResearch/tuned-lens";

/// Fetches the pretrained lens of `resource_id` (a model's hub id, e.g.
/// `EleutherAI/pythia-160m-deduped`) into the Hugging Face cache; returns its folder.
pub fn fetch_pretrained(resource_id: &str) -> Result<PathBuf> {
    let repo_id =
        std::env::var("TUNED_LENS_REPO_ID").unwrap_or_else(|_| PRETRAINED_LENS_REPO.into());
    let kind = match std::env::var("TUNED_LENS_REPO_TYPE").as_deref() {
        Err(_) | Ok("space") => RepoType::Space,
        Ok("model") => RepoType::Model,
        Ok("dataset") => RepoType::Dataset,
        Ok(other) => {
            return Err(Error::Lens(format!(
                "TUNED_LENS_REPO_TYPE '{other}' is not space, model or dataset"
            )))
        }
    };
    let names = ["config.json", "params.pt"].map(|file| format!("lens/{resource_id}/{file}"));
    let paths = hooks::source::hub_files_in(kind, &repo_id, "main", &names)?;
    paths[0]
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Lens(format!("unexpected cache path {}", paths[0].display())))
}

/// The pretrained lens for `model` (`resource_id`, else the model's own hub id), checked
/// against the model.
pub fn load_pretrained(model: &Model, resource_id: Option<&str>) -> Result<TunedLens> {
    let resource_id = match resource_id {
        Some(id) => id,
        None => hub_id(model).ok_or_else(|| {
            Error::Lens(format!(
                "model '{}' is not from the hub: name the pretrained lens to use by its model's \
                 hub id (pretrained:EleutherAI/pythia-160m-deduped)",
                model.origin()
            ))
        })?,
    };
    if let Some(revision) = model.revision().filter(|r| *r != "main") {
        tracing::warn!(
            "the pretrained lens of {resource_id} was trained on the model's final weights, \
             and this model is at revision '{revision}'"
        );
    }
    let lens = TunedLens::load(&fetch_pretrained(resource_id)?, model.device())?;
    lens.check_model(model)?;
    Ok(lens)
}

/// A lens named on a command line: `logit` (none: the logit lens), `pretrained` (the model's
/// lens from tuned-lens's hub collection), `pretrained:<model id>`, or a lens folder.
pub fn lens_named(name: &str, model: &Model) -> Result<Option<TunedLens>> {
    let lens = match name {
        "logit" => return Ok(None),
        "pretrained" => load_pretrained(model, None)?,
        _ => match name.strip_prefix("pretrained:") {
            Some(id) => load_pretrained(model, Some(id))?,
            None => {
                let lens = TunedLens::load(Path::new(name), model.device())?;
                lens.check_model(model)?;
                lens
            }
        },
    };
    Ok(Some(lens))
}

/// The hub id of a model loaded from the hub (its origin is `<id>@<revision>`).
fn hub_id(model: &Model) -> Option<&str> {
    let origin = model.origin();
    let (id, _) = origin.rsplit_once('@')?;
    let owner_and_name = id.split('/').count() == 2;
    (owner_and_name && !Path::new(origin).exists()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_repository_type_is_named() {
        // Only this test reads the variable.
        std::env::set_var("TUNED_LENS_REPO_TYPE", "bucket");
        let err = fetch_pretrained("EleutherAI/pythia-160m-deduped")
            .unwrap_err()
            .to_string();
        std::env::remove_var("TUNED_LENS_REPO_TYPE");
        assert!(
            err.contains("TUNED_LENS_REPO_TYPE 'bucket' is not space, model or dataset"),
            "{err}"
        );
    }
}
