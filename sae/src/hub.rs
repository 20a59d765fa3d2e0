//! SAEs from the Hugging Face hub: sparsify's released repositories
//! (`EleutherAI/sae-pythia-70m-32k`, one `<hookpoint>/cfg.json` + `sae.safetensors` folder
//! per hook point), fetched into the shared Hugging Face cache as models are. `HF_HOME`,
//! `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply as for models (see `hooks::source`).

use std::path::{Path, PathBuf};

use hooks::source::RepoType;

use crate::{Error, Result};

/// The files of one SAE folder.
const SAE_FILES: [&str; 2] = ["cfg.json", "sae.safetensors"];

/// Downloads (or finds in the cache) the SAEs of `hookpoints` in a hub repository, and
/// returns the local folder that holds their `<hookpoint>` sub-folders (the cached snapshot
/// of one commit).
pub fn fetch_from_hub(repo_id: &str, revision: &str, hookpoints: &[String]) -> Result<PathBuf> {
    if hookpoints.is_empty() {
        return Err(Error::Sae(format!(
            "name the hook points to fetch from {repo_id} (e.g. layers.0.mlp)"
        )));
    }
    let names: Vec<String> = hookpoints
        .iter()
        .flat_map(|h| SAE_FILES.map(|file| format!("{h}/{file}")))
        .collect();
    let paths = hooks::source::hub_repo_files(repo_id, revision, &names)?;
    snapshot_of(&paths[0], &names[0])
}

/// Downloads (or finds in the cache) one SAE of a hub repository: the `hookpoint` folder's,
/// or with `None` the SAE at the repository's top (a repository of a single SAE); returns
/// its local folder.
pub fn fetch_one(repo_id: &str, revision: &str, hookpoint: Option<&str>) -> Result<PathBuf> {
    if let Some(hookpoint) = hookpoint {
        return Ok(fetch_from_hub(repo_id, revision, &[hookpoint.to_string()])?.join(hookpoint));
    }
    let names = SAE_FILES.map(String::from);
    match hooks::source::hub_repo_files(repo_id, revision, &names) {
        Ok(paths) => snapshot_of(&paths[0], &names[0]),
        Err(hooks::Error::NotOnHub { .. }) => Err(Error::Sae(format!(
            "the hub repository {repo_id} (revision {revision}) holds no SAE at its top: name \
             one of its hook points ({})",
            hub_hookpoints(repo_id, revision)?.join(", ")
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The hook points a hub repository holds SAEs for (its `<hookpoint>/cfg.json` folders), in
/// natural order. Online from the hub's listing; under `HF_HUB_OFFLINE`, those in the cache.
pub fn hub_hookpoints(repo_id: &str, revision: &str) -> Result<Vec<String>> {
    let mut hookpoints: Vec<String> = if hooks::source::hub_offline() {
        let snapshot = hooks::source::cached_snapshot(RepoType::Model, repo_id, revision);
        let cached = snapshot.map(|s| crate::sae_folders(&s)).unwrap_or_default();
        if !cached.is_empty() {
            tracing::warn!(
                "HF_HUB_OFFLINE is set: the SAEs of {repo_id} in the cache ({})",
                cached.join(", ")
            );
        }
        cached
    } else {
        let listing =
            hooks::source::hub_listing(RepoType::Model, repo_id, revision, "to find its SAEs")?;
        listing
            .files
            .iter()
            .filter_map(|f| f.strip_suffix("/cfg.json"))
            .filter(|folder| !folder.contains('/'))
            .map(str::to_string)
            .collect()
    };
    hookpoints.sort_by(|a, b| crate::natural_order(a, b));
    if hookpoints.is_empty() && hooks::source::hub_offline() {
        return Err(hooks::source::not_cached(
            RepoType::Model,
            repo_id,
            revision,
            "HF_HUB_OFFLINE is set, and the cache holds none of its SAE folders".into(),
        )
        .into());
    }
    if hookpoints.is_empty() {
        return Err(Error::Sae(format!(
            "the hub repository {repo_id} (revision {revision}) holds no SAE folders \
             (<hookpoint>/cfg.json)"
        )));
    }
    Ok(hookpoints)
}

/// Whether `source` names a hub repository of SAEs rather than a local folder: it does not
/// exist here and has the form `owner/name`.
fn is_hub_source(source: &Path) -> bool {
    let name = source.to_string_lossy();
    !source.exists() && name.contains('/') && hooks::source::is_hub_id(&name)
}

/// Refuses a `source` of SAEs that is neither an existing path nor a hub repository id, before
/// anything is loaded.
pub fn check_sae_source(source: &Path) -> Result<()> {
    if source.exists() || is_hub_source(source) {
        return Ok(());
    }
    Err(Error::NotFound(format!(
        "{}: no such folder, and not a hub repository id (owner/name)",
        source.display()
    )))
}

/// The local folder of `<hookpoint>/` SAE folders that `source` names: the folder itself
/// when it exists, else a hub repository (`owner/name`) at `revision` (default `main`) with
/// the SAEs of `hookpoints` fetched into the cache (every SAE in it when `None`). A path that
/// is neither is refused, as is a revision given with a local folder.
pub fn sae_root(
    source: &Path,
    revision: Option<&str>,
    hookpoints: Option<&[String]>,
) -> Result<PathBuf> {
    check_sae_source(source)?;
    let name = source.to_string_lossy();
    if !is_hub_source(source) {
        if let Some(revision) = revision {
            return Err(Error::Sae(format!(
                "revision '{revision}' applies to hub repositories, and {} is a local path",
                source.display()
            )));
        }
        return Ok(source.to_path_buf());
    }
    let revision = revision.unwrap_or("main");
    let fetched = match hookpoints {
        Some(hookpoints) => fetch_from_hub(&name, revision, hookpoints),
        None => hub_hookpoints(&name, revision).and_then(|all| {
            tracing::info!(
                "fetching all {} SAEs of {name} (name some to fetch fewer): {}",
                all.len(),
                all.join(", ")
            );
            fetch_from_hub(&name, revision, &all)
        }),
    };
    // A repository that cannot be reached may have been meant as a local folder.
    fetched.map_err(|e| match e {
        Error::Hooks(hooks::Error::NotCached {
            model,
            revision,
            cache_dir,
            reason,
        }) => Error::Hooks(hooks::Error::NotCached {
            model,
            revision,
            cache_dir,
            reason: Some(format!(
                "{}; nor is there a local folder {}",
                reason.as_deref().unwrap_or("HF_HUB_OFFLINE is set"),
                std::path::absolute(source)
                    .unwrap_or_else(|_| source.to_path_buf())
                    .display()
            )),
        }),
        other => other,
    })
}

/// The snapshot folder a file of the repository at path `name` was fetched into.
fn snapshot_of(fetched: &Path, name: &str) -> Result<PathBuf> {
    fetched
        .ancestors()
        .nth(Path::new(name).components().count())
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Sae(format!("unexpected cache path {}", fetched.display())))
}
