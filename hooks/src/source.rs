//! Where weights come from: a short name, a hub id, a local folder or a `.gguf` file,
//! resolved to local files (downloading through `hf-hub` into the shared Hugging Face cache).
//!
//! Environment: `HF_HOME` moves the cache, `HF_TOKEN` authenticates (else the cached token
//! file), `HF_HUB_OFFLINE=1` never touches the network, `HF_ENDPOINT` changes the server.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
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
    /// How [`crate::Model::origin`] names the model this spec loads, e.g.
    /// `EleutherAI/pythia-70m@step1000` or a folder's path.
    pub fn origin(&self) -> String {
        match self {
            ModelSpec::Hub { repo_id, revision } => format!("{repo_id}@{revision}"),
            ModelSpec::Folder(path) | ModelSpec::Gguf(path) => path.display().to_string(),
        }
    }

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
        if is_hub_id(name) {
            Ok(ModelSpec::Hub {
                repo_id: name.to_string(),
                revision,
            })
        } else {
            Err(not_found(
                name,
                "not a folder, a .gguf file, a Pythia short name or a hub id (owner/name)",
            ))
        }
    }
}

/// Whether `name` can be a hub repository id: `owner/name` or a bare `name` (as `gpt2`), of
/// letters, digits, `-`, `_` and `.`, not starting with `.` (a path such as `./saes`).
pub fn is_hub_id(name: &str) -> bool {
    let valid = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match name.split('/').collect::<Vec<_>>().as_slice() {
        [owner, repo] => valid(owner) && valid(repo),
        [repo] => valid(repo),
        _ => false,
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
        let origin = spec.origin();
        match spec {
            ModelSpec::Folder(dir) => from_folder(dir, origin),
            ModelSpec::Gguf(path) => Ok(ModelFiles {
                config: None,
                tokenizer: None,
                weights: WeightFiles::Gguf(path.clone()),
                origin,
                revision: None,
            }),
            ModelSpec::Hub { repo_id, revision } => from_hub(repo_id, revision, &origin),
        }
    }
}

/// Weight file layouts in order of preference: (index file, single file, is safetensors).
const WEIGHT_LAYOUTS: [(&str, &str, bool); 2] = [
    ("model.safetensors.index.json", "model.safetensors", true),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", false),
];

fn from_folder(dir: &Path, origin: String) -> Result<ModelFiles> {
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
        origin,
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
    if shards.is_empty() {
        return Err(Error::WeightFile {
            path: index.into(),
            message: "its 'weight_map' lists no weight files".into(),
        });
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

fn from_hub(repo_id: &str, revision: &str, origin: &str) -> Result<ModelFiles> {
    let hub = HubRevision::new(RepoType::Model, repo_id, revision);

    // Everything already cached: use it without touching the network.
    if let Some(snapshot) = hub.cached_snapshot() {
        let cached = hub_files(origin, revision, |name| {
            let path = snapshot.join(name);
            path.exists().then_some(path)
        })?;
        if let Some(files) = cached {
            return Ok(files);
        }
    }
    if hub_offline() {
        return Err(hub.not_cached(None));
    }

    let listing = hub.listing("to find its weight files")?;
    let mut fetch_error = None;
    let files = hub_files(origin, revision, |name| {
        if !listing.files.iter().any(|f| f == name) {
            return None;
        }
        match hub.fetch(&listing, &[name.to_string()]) {
            Ok(mut paths) => paths.pop(),
            Err(e) => {
                fetch_error.get_or_insert(e);
                None
            }
        }
    })?;
    match (files, fetch_error) {
        (Some(files), Some(e)) => {
            // An optional file (the tokenizer) that failed: the model runs without it.
            tracing::warn!("{e}; loading without it");
            Ok(files)
        }
        (Some(files), None) => Ok(files),
        (None, Some(e)) => Err(e),
        (None, None) => Err(not_found(
            repo_id,
            &format!(
                "revision '{revision}' has no config.json and weights (files: {})",
                listing.files.join(", ")
            ),
        )),
    }
}

/// Why a hub request failed, in words that say what to do; `missing` says what a 404 means
/// is not there.
fn hub_failure(error: &ApiError, missing: &str) -> String {
    let request = match error {
        ApiError::TooManyRetries(inner) => return hub_failure(inner, missing),
        ApiError::RequestError(request) => request,
        ApiError::LockAcquisition(lock) => {
            return format!(
                "another process is downloading this file (it holds {}); run again when it \
                 is done, or delete that lock file if no download is running",
                lock.display()
            )
        }
        other => return other.to_string(),
    };
    match request.as_ref() {
        ureq::Error::StatusCode(401) => "the hub refused access (HTTP 401): the repository \
             does not exist, or it is private or gated; check its name, and put a token that may \
             read it in HF_TOKEN"
            .into(),
        ureq::Error::StatusCode(403) => "the hub refused access (HTTP 403): the repository is \
             gated or private; request access on its page with the account whose token is in \
             HF_TOKEN"
            .into(),
        ureq::Error::StatusCode(404) => format!("the hub has no such {missing} (HTTP 404)"),
        ureq::Error::StatusCode(416) => "the hub refused to resume a download (HTTP 416): \
             delete the partial downloads (*.part) in the repository's blobs folder of the cache, \
             and run again"
            .into(),
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

/// What the hub lists for a repository at a revision.
#[derive(Debug, Clone)]
pub struct HubListing {
    /// The commit the revision resolves to now.
    pub commit: String,
    /// The paths of its files.
    pub files: Vec<String>,
}

/// One revision of a hub repository, as the shared Hugging Face cache and the hub see it.
/// Files asked for together come from one commit: the cache's snapshot of the revision when
/// it holds them all, else the snapshot of the commit the hub's listing names (a revision
/// that moved since an earlier fetch does not mix the two).
struct HubRevision {
    repo: Repo,
    cache: Cache,
}

impl HubRevision {
    fn new(kind: RepoType, repo_id: &str, revision: &str) -> Self {
        HubRevision {
            repo: Repo::with_revision(repo_id.into(), kind, revision.into()),
            cache: Cache::from_env(),
        }
    }

    /// The repository as its URL names it (`owner/name`, `spaces/owner/name`).
    fn name(&self) -> String {
        self.repo.url()
    }

    fn not_cached(&self, reason: Option<String>) -> Error {
        Error::NotCached {
            model: self.name(),
            revision: self.repo.revision().into(),
            cache_dir: self.cache.path().clone(),
            reason,
        }
    }

    /// The cache's snapshot of the revision: of the commit its ref names, or of the revision
    /// itself when that is a commit hash (as huggingface_hub caches one), if present.
    fn cached_snapshot(&self) -> Option<PathBuf> {
        // hf-hub names snapshot folders only by commit: the parent of any one of them is
        // the repository's snapshots folder, and the parent of that the repository's.
        let any_snapshot = self.cache.repo(self.repo.clone()).pointer_path("-");
        let snapshots = any_snapshot.parent()?;
        let revision = self.repo.revision();
        let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
        let commit = std::fs::read_to_string(snapshots.parent()?.join("refs").join(revision))
            .ok()
            .map(|commit| commit.trim().to_string())
            .or_else(|| is_commit.then(|| revision.to_string()))?;
        let snapshot = snapshots.join(commit);
        snapshot.is_dir().then_some(snapshot)
    }

    /// The files at `names`, when the cache's snapshot holds them all.
    fn cached(&self, names: &[String]) -> Option<Vec<PathBuf>> {
        let snapshot = self.cached_snapshot()?;
        names
            .iter()
            .map(|name| Some(snapshot.join(name)).filter(|path| path.exists()))
            .collect()
    }

    fn api(&self) -> Result<hf_hub::api::sync::Api> {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| self.cache.token());
        let api = ApiBuilder::from_env()
            .with_token(token)
            .with_progress(std::io::stderr().is_terminal())
            .with_retries(2)
            .build()
            .map_err(|e| self.not_cached(Some(hub_failure(&e, "repository"))))?;
        Ok(api)
    }

    /// The hub's listing of the revision; needs the network (`why` says what for).
    fn listing(&self, why: &str) -> Result<HubListing> {
        if hub_offline() {
            return Err(self.not_cached(Some(format!(
                "HF_HUB_OFFLINE is set, and listing the repository ({why}) needs the network"
            ))));
        }
        let info = self.api()?.repo(self.repo.clone()).info().map_err(|e| {
            let missing = "repository or revision (or none that the token in use may see)";
            self.not_cached(Some(hub_failure(&e, missing)))
        })?;
        Ok(HubListing {
            commit: info.sha,
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
        })
    }

    /// `names` (all in `listing`) in the snapshot of the listing's commit: linked to a blob
    /// the cache already holds (a file unchanged since a fetch at another commit), else
    /// downloaded.
    fn fetch(&self, listing: &HubListing, names: &[String]) -> Result<Vec<PathBuf>> {
        let cached = self.cache.repo(self.repo.clone());
        let snapshot = cached.pointer_path(&listing.commit);
        let api = self.api()?;
        let remote = api.repo(self.repo.clone());
        let failed = |name: &str, e: ApiError| {
            self.not_cached(Some(format!("{name}: {}", hub_failure(&e, "file"))))
        };
        let moved = |name: &str| {
            self.not_cached(Some(format!(
                "{name}: the revision moved from commit {} to another while its files were \
                 fetched; run again",
                listing.commit
            )))
        };
        names
            .iter()
            .map(|name| {
                let path = snapshot.join(name);
                if path.exists() {
                    return Ok(path);
                }
                let metadata = api
                    .metadata(&remote.url(name))
                    .map_err(|e| failed(name, e))?;
                if metadata.commit_hash() != listing.commit {
                    return Err(moved(name));
                }
                let blob = cached.blob_path(metadata.etag());
                let size = metadata.size() as u64;
                let held = std::fs::metadata(&blob).is_ok_and(|b| b.len() == size);
                if held {
                    link_blob(&blob, &path, name).map_err(|e| Error::io(&path, e))?;
                    cached
                        .create_ref(&listing.commit)
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(path);
                }
                discard_stale_part(&blob, size, name)?;
                tracing::info!(
                    "fetching {name} from {}@{}",
                    self.name(),
                    self.repo.revision()
                );
                let fetched = remote.download(name).map_err(|e| failed(name, e))?;
                if fetched != path {
                    return Err(moved(name));
                }
                // hf-hub retries a failed resumption from the first byte while appending, so
                // a download can come out longer than the file; such a file is not kept.
                let got = std::fs::metadata(&path)
                    .map_err(|e| Error::io(&path, e))?
                    .len();
                if got != size {
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(&blob);
                    return Err(self.not_cached(Some(format!(
                        "{name}: the download came out {got} bytes where the hub lists {size}; \
                         it was removed from the cache: run again"
                    ))));
                }
                Ok(path)
            })
            .collect()
    }
}

/// Deletes hf-hub's partial download of `blob` (`<blob>.part`) when it cannot be resumed, being
/// as long as the file (`size` bytes) or longer: a run stopped between the download and its
/// rename. hf-hub would ask the hub for the bytes after its end (HTTP 416) or refuse it as
/// corrupted. A part that another process is writing (it holds `<blob>.lock`, as hf-hub does
/// while downloading) is left alone; so is any part where there are no such locks (not Unix).
fn discard_stale_part(blob: &Path, size: u64, name: &str) -> Result<()> {
    let (mut part, mut lock) = (blob.to_path_buf(), blob.to_path_buf());
    part.set_extension("part");
    lock.set_extension("lock");
    let stale = || std::fs::metadata(&part).is_ok_and(|p| p.len() >= size);
    if !stale() {
        return Ok(());
    }
    #[cfg(not(unix))]
    return Ok(());
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let held = std::fs::File::create(&lock).map_err(|e| Error::io(&lock, e))?;
        // SAFETY: flock on a file descriptor this function owns; released when it closes.
        let locked = unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        // Another process may have finished with the part between the two looks.
        if !locked || !stale() {
            return Ok(());
        }
        tracing::warn!(
            "discarding {}, a partial download of {name} that cannot be resumed (an interrupted \
             run)",
            part.display()
        );
        match std::fs::remove_file(&part) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&part, e)),
            _ => Ok(()),
        }
    }
}

/// Points `path`, the snapshot's entry for the repository file `name`, at `blob` as hf-hub
/// does: a relative symbolic link (a copy where there are none).
fn link_blob(blob: &Path, path: &Path, name: &str) -> std::io::Result<()> {
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder)?;
    }
    // From the file's folder up through the name's folders, the commit and `snapshots/`.
    let mut target = PathBuf::new();
    for _ in 0..Path::new(name).components().count() + 1 {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    #[cfg(unix)]
    return std::os::unix::fs::symlink(target, path);
    #[cfg(not(unix))]
    return std::fs::copy(blob, path).map(|_| ());
}

/// Files of any hub model repository by their paths inside it (e.g. the
/// `<hookpoint>/cfg.json` of a repo of SAEs), in the order asked, all of one commit: from the
/// shared cache when it holds them all (no network), else downloaded into it unless
/// `HF_HUB_OFFLINE` is set ([`Error::NotCached`] names the repo, revision and cache folder;
/// [`Error::NotOnHub`] the files the repository lacks).
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
    let hub = HubRevision::new(kind, repo_id, revision);
    if let Some(name) = names.iter().find(|name| {
        name.is_empty()
            || !Path::new(name)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
    }) {
        return Err(Error::InvalidArgument(format!(
            "'{name}' is not a path inside a hub repository (names such as layers.0/cfg.json)"
        )));
    }
    if let Some(paths) = hub.cached(names) {
        return Ok(paths);
    }
    if hub_offline() {
        let snapshot = hub.cached_snapshot();
        let lacking: Vec<&str> = names
            .iter()
            .filter(|name| !snapshot.as_ref().is_some_and(|s| s.join(name).exists()))
            .map(String::as_str)
            .collect();
        return Err(hub.not_cached(Some(format!(
            "HF_HUB_OFFLINE is set, and the cache lacks {}",
            lacking.join(", ")
        ))));
    }
    let listing = hub.listing("to find the files asked for")?;
    let missing: Vec<String> = names
        .iter()
        .filter(|name| !listing.files.contains(name))
        .cloned()
        .collect();
    // The hub may cut a long listing short: past this many files, a file it leaves out is
    // asked for all the same.
    const COMPLETE_LISTING_BELOW: usize = 1000;
    if !missing.is_empty() && listing.files.len() < COMPLETE_LISTING_BELOW {
        return Err(Error::NotOnHub {
            repo: hub.name(),
            revision: revision.into(),
            missing,
        });
    }
    hub.fetch(&listing, names)
}

/// The hub's listing of a repository at `revision`: its commit and every file's path. Needs
/// the network: under `HF_HUB_OFFLINE` it is [`Error::NotCached`], naming `why` (what the
/// listing was for).
pub fn hub_listing(kind: RepoType, repo_id: &str, revision: &str, why: &str) -> Result<HubListing> {
    HubRevision::new(kind, repo_id, revision).listing(why)
}

/// [`Error::NotCached`] for a repository's `revision`, with `reason`.
pub fn not_cached(kind: RepoType, repo_id: &str, revision: &str, reason: String) -> Error {
    HubRevision::new(kind, repo_id, revision).not_cached(Some(reason))
}

/// The cache's snapshot folder of a repository's `revision` (what an earlier fetch left
/// there), if there is one.
pub fn cached_snapshot(kind: RepoType, repo_id: &str, revision: &str) -> Option<PathBuf> {
    HubRevision::new(kind, repo_id, revision).cached_snapshot()
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
        let err = ModelFiles::resolve(&ModelSpec::Folder(dir.path().into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model-00002-of-00002.safetensors") && err.contains("missing"),
            "{err}"
        );
        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), "").unwrap();
        let files = ModelFiles::resolve(&ModelSpec::Folder(dir.path().into())).unwrap();
        let WeightFiles::Safetensors(paths) = files.weights else {
            panic!()
        };
        assert_eq!(paths.len(), 2);
        assert!(paths[0].ends_with("model-00001-of-00002.safetensors"));
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {}}"#,
        )
        .unwrap();
        let err = ModelFiles::resolve(&ModelSpec::Folder(dir.path().into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains("'weight_map' lists no weight files"),
            "{err}"
        );
    }
}
