//! SAEs from the Hugging Face hub: sparsify's released repositories
//! (`EleutherAI/sae-pythia-70m-32k`, one `<hookpoint>/cfg.json` + `sae.safetensors` folder
//! per hook point), fetched into the shared Hugging Face cache as models are. `HF_HOME`,
//! `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply as for models (see `hooks::source`).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The files of one SAE folder.
const SAE_FILES: [&str; 2] = ["cfg.json", "sae.safetensors"];

/// Whether `name` reads as a hub repository id (`owner/name`) rather than a local path
/// such as `/data/saes` or `./saes`.
pub fn is_hub_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// Downloads (or finds in the cache) the SAEs of `hookpoints` in a hub repository, and
/// returns the local folder that holds their `<hookpoint>` sub-folders (the cached snapshot).
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
    // <snapshot>/<hookpoint>/cfg.json -> <snapshot>
    folder_above(&paths[0], 2)
}

/// Downloads (or finds in the cache) one SAE of a hub repository: the `hookpoint` folder's,
/// or with `None` the SAE at the repository's top (a repository of a single SAE); returns
/// its local folder.
pub fn fetch_one(repo_id: &str, revision: &str, hookpoint: Option<&str>) -> Result<PathBuf> {
    match hookpoint {
        Some(hookpoint) => {
            Ok(fetch_from_hub(repo_id, revision, &[hookpoint.to_string()])?.join(hookpoint))
        }
        None => {
            let names = SAE_FILES.map(String::from);
            let paths = hooks::source::hub_repo_files(repo_id, revision, &names)?;
            folder_above(&paths[0], 1)
        }
    }
}

/// The hook points a hub repository holds SAEs for (its `<hookpoint>/cfg.json` folders),
/// sorted; needs the network.
pub fn hub_hookpoints(repo_id: &str, revision: &str) -> Result<Vec<String>> {
    let files = hooks::source::hub_repo_listing(
        repo_id,
        revision,
        "to find its SAEs; name them to use the cache alone",
    )?;
    let mut hookpoints: Vec<String> = files
        .iter()
        .filter_map(|f| f.strip_suffix("/cfg.json"))
        .filter(|folder| !folder.contains('/'))
        .map(str::to_string)
        .collect();
    hookpoints.sort();
    if hookpoints.is_empty() {
        return Err(Error::Sae(format!(
            "the hub repository {repo_id} (revision {revision}) holds no SAE folders \
             (<hookpoint>/cfg.json); its files: {}",
            files.join(", ")
        )));
    }
    Ok(hookpoints)
}

/// The local folder of `<hookpoint>/` SAE folders that `source` names: the folder itself
/// when it exists, else a hub repository (`owner/name`) at `revision` with the SAEs of
/// `hookpoints` fetched into the cache (every SAE in it when `None`). A path that is neither
/// is returned as it is, for the caller's reading of it to name.
pub fn sae_root(source: &Path, revision: &str, hookpoints: Option<&[String]>) -> Result<PathBuf> {
    let name = source.to_string_lossy();
    if source.exists() || !is_hub_id(&name) {
        return Ok(source.to_path_buf());
    }
    match hookpoints {
        Some(hookpoints) => fetch_from_hub(&name, revision, hookpoints),
        None => fetch_from_hub(&name, revision, &hub_hookpoints(&name, revision)?),
    }
}

/// The folder `levels` above a cached file.
fn folder_above(file: &Path, levels: usize) -> Result<PathBuf> {
    file.ancestors()
        .nth(levels)
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Sae(format!("unexpected cache path {}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_owner_and_name() {
        for id in ["EleutherAI/sae-pythia-70m-32k", "a/b"] {
            assert!(is_hub_id(id), "{id}");
        }
        for path in [
            "/data/saes",
            "./saes",
            "saes",
            "../x/y",
            "a/b/c",
            "a/",
            ".a/b",
        ] {
            assert!(!is_hub_id(path), "{path}");
        }
    }
}
