//! Where weights come from: a short name, a hub id, a local folder or a `.gguf` file,
//! resolved to local files (downloading through `hf-hub` into the shared Hugging Face cache).
//!
//! Environment: `HF_HOME` moves the cache, `HF_TOKEN` authenticates (else the cached token
//! file), `HF_HUB_OFFLINE=1` never touches the network, `HF_ENDPOINT` changes the server.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

/// The kind of a hub repository (model, dataset or Space), for [`hub_files_in`].
pub use hf_hub::RepoType;

use crate::weights::WeightFiles;
use crate::{Error, Result};

/// The Pythia sizes that short names such as `pythia-70m` expand to.
pub const PYTHIA_SIZES: [&str; 10] = [
    "14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b",
];

/// What a model name refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A Hugging Face hub repository at a revision (branch, tag or commit).
    Hub {
        /// `owner/name`.
        repo_id: String,
        /// Branch, tag or commit, e.g. `main` or `step1000`.
        revision: String,
    },
    /// A local folder with `config.json`, weights and usually `tokenizer.json`.
    Folder(PathBuf),
    /// A local GGUF file.
    Gguf(PathBuf),
}

impl ModelSpec {
    /// Interprets a user's model name: an existing folder or `.gguf` file, a Pythia short name
    /// (`pythia-70m`, `pythia-1b-deduped`), or a hub id (`EleutherAI/gpt-neox-20b`). A local
    /// folder's revisions are its sub-folders, as on the hub (`MODEL/step1000/config.json`);
    /// a revision a local model does not have is an error, not ignored.
    pub fn parse(name: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(name);
        if path.is_dir() {
            let Some(revision) = revision else {
                return Ok(ModelSpec::Folder(path.to_path_buf()));
            };
            let plain_name = matches!(
                Path::new(revision).components().collect::<Vec<_>>()[..],
                [std::path::Component::Normal(_)]
            );
            if !plain_name {
                return Err(not_found(
                    name,
                    &format!("revision '{revision}': a local folder's revisions are its sub-folders, named without '/' or '..'"),
                ));
            }
            let checkpoint = path.join(revision);
            if checkpoint.join("config.json").is_file() {
                return Ok(ModelSpec::Folder(checkpoint));
            }
            return Err(not_found(
                name,
                &format!(
                    "revision '{revision}': a local folder's revisions are its sub-folders (the hub layout), and {} is not a model folder",
                    checkpoint.display()
                ),
            ));
        }
        let looks_like_path =
            name.starts_with('.') || name.starts_with('/') || name.starts_with('~');
        if name.ends_with(".gguf") {
            if !path.is_file() {
                return Err(not_found(name, "no such GGUF file"));
            }
            if let Some(revision) = revision {
                return Err(not_found(
                    name,
                    &format!("revision '{revision}': a .gguf file has no revisions"),
                ));
            }
            return Ok(ModelSpec::Gguf(path.to_path_buf()));
        }
        if looks_like_path || path.is_file() {
            return Err(not_found(
                name,
                "not a model folder (expected a directory with config.json) or a .gguf file",
            ));
        }
        let revision = revision.unwrap_or("main").to_string();
        if let Some(repo_id) = expand_short_name(name) {
            return Ok(ModelSpec::Hub { repo_id, revision });
        }
        let parts: Vec<&str> = name.split('/').collect();
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match parts.as_slice() {
            [owner, repo] if valid(owner) && valid(repo) => Ok(ModelSpec::Hub {
                repo_id: name.to_string(),
                revision,
            }),
            [repo] if valid(repo) => Ok(ModelSpec::Hub {
                repo_id: name.to_string(),
                revision,
            }),
            _ => Err(not_found(
                name,
                "not a folder, a .gguf file, a Pythia short name or a hub id (owner/name)",
            )),
        }
    }
}

fn not_found(spec: &str, message: &str) -> Error {
    Error::ModelNotFound {
        spec: spec.into(),
        message: message.into(),
    }
}

/// `pythia-70m` -> `EleutherAI/pythia-70m`, also `-deduped`, `-v0` and `-deduped-v0` variants.
fn expand_short_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("pythia-")?;
    let size = rest.split('-').next()?;
    let suffix = &rest[size.len()..];
    let known_suffix = matches!(suffix, "" | "-deduped" | "-v0" | "-deduped-v0");
    (PYTHIA_SIZES.contains(&size) && known_suffix).then(|| format!("EleutherAI/{name}"))
}

/// A model resolved to local files.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// `config.json` (absent for GGUF, whose metadata holds the config).
    pub config: Option<PathBuf>,
    /// `tokenizer.json`, if the model ships one.
    pub tokenizer: Option<PathBuf>,
    /// The weights.
    pub weights: WeightFiles,
    /// A short description for manifests and messages, e.g. `EleutherAI/pythia-70m@step1000`.
    pub origin: String,
    /// Hub revision, when from the hub ([`crate::Model::load`] records a local one).
    pub revision: Option<String>,
}

impl ModelFiles {
    /// Resolves a spec, downloading from the hub when needed and allowed.
    pub fn resolve(spec: &ModelSpec) -> Result<Self> {
        match spec {
            ModelSpec::Folder(dir) => from_folder(dir),
            ModelSpec::Gguf(path) => Ok(ModelFiles {
                config: None,
                tokenizer: None,
                weights: WeightFiles::Gguf(path.clone()),
                origin: path.display().to_string(),
                revision: None,
            }),
            ModelSpec::Hub { repo_id, revision } => from_hub(repo_id, revision),
        }
    }
}

/// Weight file layouts in order of preference: (index file, single file, is safetensors).
const WEIGHT_LAYOUTS: [(&str, &str, bool); 2] = [
    ("model.safetensors.index.json", "model.safetensors", true),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", false),
];

fn from_folder(dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(Error::Config {
            path: config,
            message: "missing: a model folder needs config.json".into(),
        });
    }
    let weights = folder_weights(dir, |name| {
        let p = dir.join(name);
        p.is_file().then_some(p)
    })?
    .ok_or_else(|| {
        not_found(
            &dir.display().to_string(),
            "no weights found (model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)",
        )
    })?;
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(ModelFiles {
        config: Some(config),
        tokenizer,
        weights,
        origin: dir.display().to_string(),
        revision: None,
    })
}

/// Finds the weight files through `fetch`, which maps a file name to a local path (or
/// `None` when that file does not exist). Shards named by an index file must all exist.
fn folder_weights(
    dir: &Path,
    mut fetch: impl FnMut(&str) -> Option<PathBuf>,
) -> Result<Option<WeightFiles>> {
    for (index_name, single_name, safetensors) in WEIGHT_LAYOUTS {
        let files = if let Some(index) = fetch(index_name) {
            let shards = shard_names(&index)?;
            let mut paths = Vec::with_capacity(shards.len());
            for shard in shards {
                let path = fetch(&shard).ok_or_else(|| Error::WeightFile {
                    path: dir.join(&shard),
                    message: format!("shard listed in {index_name} is missing"),
                })?;
                paths.push(path);
            }
            paths
        } else if let Some(single) = fetch(single_name) {
            vec![single]
        } else {
            continue;
        };
        return Ok(Some(if safetensors {
            WeightFiles::Safetensors(files)
        } else {
            WeightFiles::Pickle(files)
        }));
    }
    Ok(None)
}

/// The distinct shard file names in a `*.index.json` weight map, in first-seen order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::WeightFile {
        path: index.into(),
        message: format!("not valid JSON: {e}"),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::WeightFile {
            path: index.into(),
            message: "missing object 'weight_map'".into(),
        })?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| Error::WeightFile {
            path: index.into(),
            message: format!("weight_map value {file} is not a file name"),
        })?;
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

/// Whether two model origins (as [`crate::Model::origin`] gives them, and files made from a
/// model record them) name the same model: the same text, or paths to the same file or
/// folder.
pub fn same_origin(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// True when `HF_HUB_OFFLINE` asks for no network access.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn from_hub(repo_id: &str, revision: &str) -> Result<ModelFiles> {
    let cache = Cache::from_env();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cached = cache.repo(repo.clone());
    let origin = format!("{repo_id}@{revision}");
    let not_cached = |reason: Option<String>| Error::NotCached {
        model: repo_id.into(),
        revision: revision.into(),
        cache_dir: cache.path().clone(),
        reason,
    };

    // Everything already cached: use it without touching the network.
    if let Some(files) = hub_files(&origin, revision, |name| cached.get(name))? {
        return Ok(files);
    }
    if hub_offline() {
        return Err(not_cached(None));
    }

    let available = hub_repo_listing(repo_id, revision, "to find its weight files")?;
    let remote = hub_api(&cache)
        .map_err(|e| not_cached(Some(e.to_string())))?
        .repo(repo);
    let mut download_error = None;
    let files = hub_files(&origin, revision, |name| {
        if !available.iter().any(|a| a == name) {
            return None;
        }
        tracing::info!("fetching {name} from {origin}");
        match remote.get(name) {
            Ok(path) => Some(path),
            Err(e) => {
                download_error.get_or_insert(format!("{name}: {}", hub_failure(&e, "file")));
                None
            }
        }
    })?;
    match (files, download_error) {
        (Some(files), _) => Ok(files),
        (None, Some(e)) => Err(not_cached(Some(e))),
        (None, None) => Err(not_found(
            repo_id,
            &format!(
                "revision '{revision}' has no config.json and weights (files: {})",
                available.join(", ")
            ),
        )),
    }
}

/// Why a hub request failed, in words that say what to do; `missing` names what a 404
/// means was not found ("file", "repository or revision").
fn hub_failure(error: &hf_hub::api::sync::ApiError, missing: &str) -> String {
    let hf_hub::api::sync::ApiError::RequestError(request) = error else {
        return error.to_string();
    };
    match request.as_ref() {
        ureq::Error::StatusCode(code @ (401 | 403)) => format!(
            "the hub refused access (HTTP {code}): the repository does not exist, or it is \
             private or gated; check its name, and put a token that may read it in HF_TOKEN"
        ),
        ureq::Error::StatusCode(404) => format!("the hub has no such {missing} (HTTP 404)"),
        ureq::Error::StatusCode(code) => format!("the hub answered HTTP {code}"),
        ureq::Error::Io(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Timeout(_) => format!(
            "the hub at {} could not be reached ({request}); with the files in the cache, \
             HF_HUB_OFFLINE=1 uses them without the network",
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
        ),
        other => other.to_string(),
    }
}

/// The hub client: `HF_TOKEN` (else the cached token), progress bars on a terminal.
fn hub_api(
    cache: &Cache,
) -> std::result::Result<hf_hub::api::sync::Api, hf_hub::api::sync::ApiError> {
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    ApiBuilder::from_env()
        .with_token(token)
        .with_progress(std::io::stderr().is_terminal())
        .with_retries(2)
        .build()
}

/// Files of any hub model repository by their paths inside it (e.g. the
/// `<hookpoint>/cfg.json` of a repo of SAEs), in the order asked: from the shared cache
/// when all are there (no network), else downloaded into it unless `HF_HUB_OFFLINE` is set
/// ([`Error::NotCached`] names the repo, revision and cache folder).
pub fn hub_repo_files(repo_id: &str, revision: &str, names: &[String]) -> Result<Vec<PathBuf>> {
    hub_files_in(RepoType::Model, repo_id, revision, names)
}

/// [`hub_repo_files`] of a repository of any kind: a model, a dataset or a Space (such as
/// tuned-lens's `AlignmentResearch/tuned-lens`, which holds its pretrained lenses).
pub fn hub_files_in(
    kind: RepoType,
    repo_id: &str,
    revision: &str,
    names: &[String],
) -> Result<Vec<PathBuf>> {
    let cache = Cache::from_env();
    let repo = Repo::with_revision(repo_id.to_string(), kind, revision.to_string());
    let shown = repo.url();
    let not_cached = |reason: Option<String>| Error::NotCached {
        model: shown.clone(),
        revision: revision.into(),
        cache_dir: cache.path().clone(),
        reason,
    };
    let cached = cache.repo(repo.clone());
    if let Some(paths) = names
        .iter()
        .map(|n| cached.get(n))
        .collect::<Option<Vec<_>>>()
    {
        return Ok(paths);
    }
    if hub_offline() {
        let missing: Vec<&str> = names
            .iter()
            .filter(|n| cached.get(n).is_none())
            .map(String::as_str)
            .collect();
        return Err(not_cached(Some(format!(
            "not cached: {}",
            missing.join(", ")
        ))));
    }
    let remote = hub_api(&cache)
        .map_err(|e| not_cached(Some(e.to_string())))?
        .repo(repo);
    names
        .iter()
        .map(|name| {
            tracing::info!("fetching {name} from {repo_id}@{revision}");
            remote
                .get(name)
                .map_err(|e| not_cached(Some(format!("{name}: {}", hub_failure(&e, "file")))))
        })
        .collect()
}

/// The paths of every file in a hub repository at `revision` (the hub's listing; needs the
/// network, so under `HF_HUB_OFFLINE` it is [`Error::NotCached`], naming `why`: what the
/// listing was for).
pub fn hub_repo_listing(repo_id: &str, revision: &str, why: &str) -> Result<Vec<String>> {
    let cache = Cache::from_env();
    let not_cached = |reason: String| Error::NotCached {
        model: repo_id.into(),
        revision: revision.into(),
        cache_dir: cache.path().clone(),
        reason: Some(reason),
    };
    if hub_offline() {
        return Err(not_cached(format!(
            "HF_HUB_OFFLINE is set, and listing the repository ({why}) needs the network"
        )));
    }
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let listing = hub_api(&cache)
        .map_err(|e| not_cached(e.to_string()))?
        .repo(repo)
        .info()
        .map_err(|e| not_cached(hub_failure(&e, "repository or revision")))?;
    Ok(listing.siblings.into_iter().map(|s| s.rfilename).collect())
}

/// Assembles hub files through `fetch`; `None` when config or weights are unavailable.
fn hub_files(
    origin: &str,
    revision: &str,
    mut fetch: impl FnMut(&str) -> Option<PathBuf>,
) -> Result<Option<ModelFiles>> {
    let Some(config) = fetch("config.json") else {
        return Ok(None);
    };
    let Some(weights) = folder_weights(Path::new(origin), &mut fetch)? else {
        return Ok(None);
    };
    let tokenizer = fetch("tokenizer.json");
    Ok(Some(ModelFiles {
        config: Some(config),
        tokenizer,
        weights,
        origin: origin.to_string(),
        revision: Some(revision.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_expand_to_eleuther_repos() {
        for (name, repo) in [
            ("pythia-70m", "EleutherAI/pythia-70m"),
            ("pythia-1.4b-deduped", "EleutherAI/pythia-1.4b-deduped"),
            ("pythia-12b", "EleutherAI/pythia-12b"),
            (
                "pythia-160m-deduped-v0",
                "EleutherAI/pythia-160m-deduped-v0",
            ),
        ] {
            let spec = ModelSpec::parse(name, Some("step1000")).unwrap();
            assert_eq!(
                spec,
                ModelSpec::Hub {
                    repo_id: repo.into(),
                    revision: "step1000".into()
                }
            );
        }
        assert_eq!(expand_short_name("pythia-71m"), None);
        assert_eq!(expand_short_name("pythia-70m-foo"), None);
    }

    #[test]
    fn hub_ids_and_bad_names() {
        let spec = ModelSpec::parse("EleutherAI/gpt-neox-20b", None).unwrap();
        assert_eq!(
            spec,
            ModelSpec::Hub {
                repo_id: "EleutherAI/gpt-neox-20b".into(),
                revision: "main".into()
            }
        );
        assert!(ModelSpec::parse("./no/such/folder", None).is_err());
        assert!(ModelSpec::parse("missing.gguf", None).is_err());
        assert!(ModelSpec::parse("a/b/c", None).is_err());
    }

    #[test]
    fn local_revisions_are_sub_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        std::fs::create_dir(dir.path().join("step8")).unwrap();
        std::fs::write(dir.path().join("step8/config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.gguf"), "GGUF").unwrap();
        assert_eq!(
            ModelSpec::parse(root, None).unwrap(),
            ModelSpec::Folder(dir.path().into())
        );
        assert_eq!(
            ModelSpec::parse(root, Some("step8")).unwrap(),
            ModelSpec::Folder(dir.path().join("step8"))
        );
        // A revision the folder does not have was ignored: the base folder was loaded.
        let err = ModelSpec::parse(root, Some("step16"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("revision 'step16': a local folder's revisions are its sub-folders")
                && err.contains("step16 is not a model folder"),
            "{err}"
        );
        for outside in ["..", "../step8", "step8/../step8", "/", "."] {
            let err = ModelSpec::parse(root, Some(outside))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("named without '/' or '..'"),
                "{outside}: {err}"
            );
        }
        let gguf = dir.path().join("model.gguf");
        let gguf = gguf.to_str().unwrap();
        assert_eq!(
            ModelSpec::parse(gguf, None).unwrap(),
            ModelSpec::Gguf(gguf.into())
        );
        let err = ModelSpec::parse(gguf, Some("main"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a .gguf file has no revisions"), "{err}");
    }

    #[test]
    fn offline_without_cache_names_model_revision_and_cache() {
        let home = tempfile::tempdir().unwrap();
        // Environment changes are process-wide; this test only sets variables no other test reads.
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let err = ModelFiles::resolve(&ModelSpec::parse("pythia-70m", Some("step1000")).unwrap())
            .unwrap_err()
            .to_string();
        std::env::remove_var("HF_HUB_OFFLINE");
        std::env::remove_var("HF_HOME");
        assert!(err.contains("EleutherAI/pythia-70m"), "{err}");
        assert!(err.contains("step1000"), "{err}");
        assert!(
            err.contains(&home.path().join("hub").display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn folder_with_sharded_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), "").unwrap();
        let err = from_folder(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model-00002-of-00002.safetensors") && err.contains("missing"),
            "{err}"
        );
        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), "").unwrap();
        let files = from_folder(dir.path()).unwrap();
        let WeightFiles::Safetensors(paths) = files.weights else {
            panic!()
        };
        assert_eq!(paths.len(), 2);
        assert!(paths[0].ends_with("model-00001-of-00002.safetensors"));
    }
}
