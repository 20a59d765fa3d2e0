//! Downloads from the Hugging Face hub through hf-hub's own client, against a small HTTP
//! server on 127.0.0.1 (`HF_ENDPOINT`) that answers as the hub does: the repository listing
//! at `/api/{models,spaces}/<repo>/revision/<rev>`, and files at `/<repo>/resolve/<rev>/<path>`
//! with the range requests, `ETag`, `X-Repo-Commit` and `Content-Range` headers hf-hub reads
//! (large files through a redirect to a CDN with `X-Linked-Etag`, as the hub serves LFS files).
//! The files land in a fresh `HF_HOME`, laid out as the hub's cache, and a second load
//! under `HF_HUB_OFFLINE=1` reads them there without a request.
//!
//! The environment is process-wide, so the tests of this binary take turns (`serial`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

mod common;

/// One revision of a hub repository: its files by path inside the repository.
struct HubRepo {
    /// `models` or `spaces`.
    kind: &'static str,
    id: String,
    revision: String,
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
    /// A commit the revision moves to once its listing has been served (a push racing a
    /// download).
    moves_after_listing: Option<String>,
    /// Listed to anyone, its files only to a token granted access (none is, here).
    gated: bool,
    /// Answers the first request that resumes a download (a range past byte 0) with 503.
    fail_first_resume: AtomicBool,
}

impl HubRepo {
    /// A model repository's `revision` holding the files of `folder` (not its sub-folders).
    fn model_folder(id: &str, revision: &str, folder: &Path) -> Self {
        let mut repo = HubRepo {
            kind: "models",
            id: id.into(),
            revision: revision.into(),
            commit: format!("{:040x}", fnv(format!("{id}@{revision}").as_bytes())),
            files: BTreeMap::new(),
            moves_after_listing: None,
            gated: false,
            fail_first_resume: AtomicBool::new(false),
        };
        repo.add_folder("", folder);
        repo
    }

    /// Adds the files of `folder` (not its sub-folders) under `prefix`.
    fn add_folder(&mut self, prefix: &str, folder: &Path) {
        for entry in std::fs::read_dir(folder).unwrap().flatten() {
            if entry.path().is_file() {
                let name = entry.file_name().into_string().unwrap();
                self.files.insert(
                    format!("{prefix}{name}"),
                    std::fs::read(entry.path()).unwrap(),
                );
            }
        }
    }
}

/// The server: the repositories it holds (a test may change them) and every request line
/// it was sent.
struct MockHub {
    endpoint: String,
    repos: Arc<Mutex<Vec<HubRepo>>>,
    requests: Arc<Mutex<Vec<String>>>,
    /// `path bytes=range` of every request that asked for a range.
    ranges: Arc<Mutex<Vec<String>>>,
}

impl MockHub {
    fn serve(repos: Vec<HubRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let repos = Arc::new(Mutex::new(repos));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (held, seen, ranged) = (
            Arc::clone(&repos),
            Arc::clone(&requests),
            Arc::clone(&ranges),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream, &mut held.lock().unwrap(), &seen, &ranged);
            }
        });
        MockHub {
            endpoint,
            repos,
            requests,
            ranges,
        }
    }

    /// The request lines (`GET /path`) received since the last call.
    fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

/// FNV-1a, for commit hashes and ETags that differ with the content.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Answers one request and closes the connection.
fn answer(
    mut stream: TcpStream,
    repos: &mut [HubRepo],
    seen: &Mutex<Vec<String>>,
    ranges: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let (mut range, mut token, mut host) = (None, false, String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").map(str::to_string);
            }
            token |= name.eq_ignore_ascii_case("authorization");
            if name.eq_ignore_ascii_case("host") {
                host = value.trim().to_string();
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    seen.lock().unwrap().push(format!("{method} {path}"));
    if let Some(range) = &range {
        ranges.lock().unwrap().push(format!("{path} bytes={range}"));
    }
    let respond =
        |stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]| {
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        };
    let not_found = |stream: &mut TcpStream, what: &str| {
        let body = format!("{{\"error\": \"{what}\"}}");
        respond(stream, "404 Not Found", &[], body.as_bytes());
    };
    if let Some(listing) = path.strip_prefix("/api/") {
        let found = repos.iter().position(|r| {
            listing
                == format!(
                    "{}/{}/revision/{}",
                    r.kind,
                    r.id,
                    r.revision.replace('/', "%2F")
                )
        });
        match found {
            Some(at) => {
                let repo = &mut repos[at];
                let body = serde_json::json!({
                    "sha": repo.commit,
                    "siblings": repo.files.keys().map(|f| serde_json::json!({"rfilename": f})).collect::<Vec<_>>(),
                });
                respond(&mut stream, "200 OK", &[], body.to_string().as_bytes());
                if let Some(commit) = repo.moves_after_listing.take() {
                    repo.commit = commit;
                }
            }
            // As the hub answers: 404 for a revision a repository does not have; for a
            // repository it does not show (absent, private or gated), 401 to an anonymous
            // request and 404 to one with a token.
            None if repos
                .iter()
                .any(|r| listing.starts_with(&format!("{}/{}/", r.kind, r.id))) =>
            {
                not_found(&mut stream, "Revision not found")
            }
            None if token => not_found(&mut stream, "Repository not found"),
            None => respond(
                &mut stream,
                "401 Unauthorized",
                &[],
                b"{\"error\": \"Repository not found\"}",
            ),
        }
        return;
    }
    // Large (LFS) files are served from a CDN, as the hub does: a redirect that carries
    // their ETag and commit, then ranges from the CDN.
    let (cdn, path) = match path.strip_prefix("/cdn") {
        Some(rest) => (true, rest),
        None => (false, path),
    };
    let file = repos.iter().find_map(|r| {
        let prefix = match r.kind {
            "models" => format!("/{}/resolve/{}/", r.id, r.revision.replace('/', "%2F")),
            kind => format!(
                "/{kind}/{}/resolve/{}/",
                r.id,
                r.revision.replace('/', "%2F")
            ),
        };
        let name = path.strip_prefix(&prefix)?;
        r.files.get(name).map(|bytes| (r, bytes))
    });
    let Some((repo, bytes)) = file else {
        return not_found(&mut stream, "Entry not found");
    };
    // As the hub answers for a gated repository's files: 401 to an anonymous request, 403 to
    // a token that was not granted access.
    if repo.gated {
        let status = if token {
            "403 Forbidden"
        } else {
            "401 Unauthorized"
        };
        return respond(
            &mut stream,
            status,
            &[],
            b"{\"error\": \"Access restricted\"}",
        );
    }
    let etag = format!("\"{:016x}\"", fnv(bytes));
    let large = [".safetensors", ".bin", ".pt"]
        .iter()
        .any(|ext| path.ends_with(ext));
    if large && !cdn {
        let redirect = [
            ("Location", format!("http://{host}/cdn{path}")),
            ("X-Linked-Etag", etag),
            ("X-Linked-Size", bytes.len().to_string()),
            ("X-Repo-Commit", repo.commit.clone()),
        ];
        return respond(&mut stream, "302 Found", &redirect, b"");
    }
    let size = bytes.len();
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((start, end)) => (
            start.parse::<usize>().unwrap_or(0),
            end.parse::<usize>().unwrap_or(usize::MAX),
        ),
        None => (0, usize::MAX),
    };
    if start >= size {
        let unsatisfiable = [("Content-Range", format!("bytes */{size}"))];
        return respond(
            &mut stream,
            "416 Range Not Satisfiable",
            &unsatisfiable,
            b"",
        );
    }
    if start > 0 && repo.fail_first_resume.swap(false, Ordering::SeqCst) {
        return respond(&mut stream, "503 Service Unavailable", &[], b"");
    }
    let end = end.min(size - 1);
    let content_range = ("Content-Range", format!("bytes {start}-{end}/{size}"));
    let headers = if cdn {
        vec![content_range]
    } else {
        vec![
            ("ETag", etag),
            ("X-Repo-Commit", repo.commit.clone()),
            content_range,
        ]
    };
    respond(
        &mut stream,
        "206 Partial Content",
        &headers,
        &bytes[start..=end],
    );
}

/// Serialises the tests of this binary (they set process-wide environment variables).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Points hf-hub at `hub` with an empty cache in `home`, online.
fn use_hub(hub: &MockHub, home: &Path) {
    std::env::set_var("HF_ENDPOINT", &hub.endpoint);
    std::env::set_var("HF_HOME", home);
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_TOKEN");
}

/// The message of the error loading `id` gives (panics if it loads).
fn load_error(id: &str, options: &hooks::LoadOptions) -> String {
    match hooks::Model::load(id, options) {
        Ok(_) => panic!("{id} loaded, where an error was expected"),
        Err(e) => e.to_string(),
    }
}

fn logits(model: &hooks::Model) -> Vec<f32> {
    let ids = hooks::candle_core::Tensor::new(&[[0u32, 5, 17, 100, 2]], model.device()).unwrap();
    let out = model.forward(&ids, &mut hooks::Hooks::new()).unwrap();
    out.logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn a_model_downloads_at_its_revision_and_then_loads_offline() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let folder = common::model_folder(tmp.path(), 32, 64);
    let template = serde_json::json!({"chat_template": "[{{ messages[0].content }}]", "eos_token": "<|endoftext|>"});
    std::fs::write(folder.join("tokenizer_config.json"), template.to_string()).unwrap();
    let hub = MockHub::serve(vec![HubRepo::model_folder(
        "test-org/tiny-neox",
        "step8",
        &folder,
    )]);
    let home = tmp.path().join("hf-home");
    use_hub(&hub, &home);
    let options = hooks::LoadOptions {
        revision: Some("step8".into()),
        ..Default::default()
    };

    let downloaded = hooks::Model::load("test-org/tiny-neox", &options).unwrap();
    let local = hooks::Model::load(folder.to_str().unwrap(), &Default::default()).unwrap();
    assert_eq!(logits(&downloaded), logits(&local));
    assert_eq!(downloaded.origin(), "test-org/tiny-neox@step8");
    let requests = hub.take_requests();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let get = format!("GET /test-org/tiny-neox/resolve/step8/{file}");
        assert!(requests.contains(&get), "{get} not in {requests:?}");
    }
    let cdn = "GET /cdn/test-org/tiny-neox/resolve/step8/model.safetensors".to_string();
    assert!(requests.contains(&cdn), "{cdn} not in {requests:?}");
    // The hub cache's layout: blobs, a snapshot named by the commit, and the revision's ref.
    let cached = home.join("hub/models--test-org--tiny-neox");
    let commit = std::fs::read_to_string(cached.join("refs/step8")).unwrap();
    assert!(cached
        .join("snapshots")
        .join(commit.trim())
        .join("model.safetensors")
        .is_file());
    // Its chat template: fetched from the same revision (the files the repository lacks are
    // skipped), then read from the cache.
    let hi = [serde_json::json!({"role": "user", "content": "hi"})];
    let chat = downloaded.chat().unwrap();
    assert_eq!(chat.template.render(&hi, true).unwrap(), "[hi]");
    let get = "GET /test-org/tiny-neox/resolve/step8/tokenizer_config.json".to_string();
    assert!(hub.take_requests().contains(&get), "{get}");
    let again = hooks::Model::load("test-org/tiny-neox", &options).unwrap();
    hub.take_requests();
    assert_eq!(
        again.chat().unwrap().template.render(&hi, true).unwrap(),
        "[hi]"
    );
    assert_eq!(hub.take_requests(), Vec::<String>::new());

    // Offline, from the cache: the same model, and no request.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let offline = hooks::Model::load("test-org/tiny-neox", &options).unwrap();
    assert_eq!(logits(&offline), logits(&local));
    assert!(offline.chat().is_ok());
    assert_eq!(hub.take_requests(), Vec::<String>::new());
    std::env::remove_var("HF_HUB_OFFLINE");

    // A revision the repository does not have, and a repository without weights.
    let other = hooks::LoadOptions {
        revision: Some("step9".into()),
        ..Default::default()
    };
    let err = load_error("test-org/tiny-neox", &other);
    assert!(
        err.contains("test-org/tiny-neox")
            && err.contains("step9")
            && err.contains(
                "no such repository or revision (or none that the token in use may see) (HTTP 404)"
            ),
        "{err}"
    );
    let err = load_error("test-org/absent", &Default::default());
    assert!(
        err.contains("test-org/absent")
            && err.contains("HTTP 401")
            && err.contains("private or gated")
            && err.contains("HF_TOKEN"),
        "{err}"
    );

    // No server: said so, with the way to work offline.
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let err = load_error("test-org/other", &Default::default());
    assert!(
        err.contains("http://127.0.0.1:9 could not be reached") && err.contains("HF_HUB_OFFLINE=1"),
        "{err}"
    );
}

#[test]
fn checkpoints_in_every_weight_layout_download_alike() {
    let _turn = serial();
    let fixtures = common::repo().join("tests/fixtures/gpt_neox");
    let safetensors = fixtures.join("pythia_style");
    // main: model.safetensors; step0: a PyTorch pickle; step1: a sharded safetensors index.
    let mut main = HubRepo::model_folder("test-org/pythia-style", "main", &safetensors);
    main.files.remove("expected.safetensors");
    let pickle = HubRepo::model_folder(
        "test-org/pythia-style",
        "step0",
        &fixtures.join("pythia_style_pickle"),
    );
    let mut sharded = HubRepo::model_folder("test-org/pythia-style", "step1", &safetensors);
    let weights = sharded.files.remove("model.safetensors").unwrap();
    let names: Vec<String> =
        hooks::candle_core::safetensors::load_buffer(&weights, &hooks::candle_core::Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    let shard = "model-00001-of-00001.safetensors";
    let index = serde_json::json!({"weight_map": names.iter().map(|n| (n.clone(), shard)).collect::<BTreeMap<_, _>>()});
    sharded.files.insert(shard.into(), weights);
    sharded.files.insert(
        "model.safetensors.index.json".into(),
        index.to_string().into_bytes(),
    );
    let hub = MockHub::serve(vec![main, pickle, sharded]);
    let tmp = tempfile::tempdir().unwrap();
    use_hub(&hub, tmp.path());

    let at = |revision: &str| {
        let options = hooks::LoadOptions {
            revision: Some(revision.into()),
            ..Default::default()
        };
        logits(&hooks::Model::load("test-org/pythia-style", &options).unwrap())
    };
    let expected = at("main");
    assert_eq!(at("step0"), expected);
    assert_eq!(at("step1"), expected);
    let requests = hub.take_requests();
    for get in [
        "GET /test-org/pythia-style/resolve/step0/pytorch_model.bin",
        "GET /test-org/pythia-style/resolve/step1/model-00001-of-00001.safetensors",
    ] {
        assert!(
            requests.iter().any(|r| r == get),
            "{get} not in {requests:?}"
        );
    }
}

#[test]
fn files_fetched_together_come_from_one_commit_when_the_revision_moves() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let tiny = common::repo().join("tests/fixtures/sae/tiny");
    let mut saes = HubRepo::model_folder("test-org/saes", "main", tmp.path());
    for hookpoint in ["layers.0", "layers.1", "layers.2"] {
        saes.add_folder(&format!("{hookpoint}/"), &tiny);
    }
    let hub = MockHub::serve(vec![saes]);
    use_hub(&hub, &tmp.path().join("hf-home"));

    let first = sae::hub::fetch_from_hub("test-org/saes", "main", &["layers.0".into()]).unwrap();
    // main moves to a new commit; layers.0 was fetched at the old one.
    hub.repos.lock().unwrap()[0].commit = format!("{:040x}", 7);
    let both = ["layers.0".to_string(), "layers.1".to_string()];
    hub.take_requests();
    let root = sae::hub::fetch_from_hub("test-org/saes", "main", &both).unwrap();
    assert_ne!(root, first);
    // layers.0's files are unchanged: linked to the blobs the cache holds, not downloaded
    // again (one request for their metadata, where a download makes three).
    let weights = "GET /test-org/saes/resolve/main/layers.0/sae.safetensors".to_string();
    let requests = hub.take_requests();
    assert_eq!(
        requests.iter().filter(|r| **r == weights).count(),
        1,
        "{requests:?}"
    );
    assert!(root.ends_with(format!("{:040x}", 7)), "{}", root.display());
    for hookpoint in &both {
        sae::Sae::load(&root.join(hookpoint), &hooks::candle_core::Device::Cpu).unwrap();
    }

    // The revision moves between the listing and the downloads: refused, and a rerun
    // fetches the new commit whole.
    hub.repos.lock().unwrap()[0].moves_after_listing = Some(format!("{:040x}", 8));
    let third = ["layers.2".to_string()];
    let err = sae::hub::fetch_from_hub("test-org/saes", "main", &third);
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("layers.2/cfg.json: the revision moved from commit")
            && err.contains("run again"),
        "{err}"
    );
    let root = sae::hub::fetch_from_hub("test-org/saes", "main", &third).unwrap();
    assert!(root.ends_with(format!("{:040x}", 8)), "{}", root.display());
    sae::Sae::load(&root.join("layers.2"), &hooks::candle_core::Device::Cpu).unwrap();

    // Names that leave the repository are refused before anything is read.
    for name in ["../x", "/etc", ""] {
        let err = sae::hub::fetch_from_hub("test-org/saes", "main", &[name.into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not a path inside a hub repository"),
            "{name}: {err}"
        );
    }

    // With a token, the hub answers 404 for a repository it does not show.
    std::env::set_var("HF_TOKEN", "hf_test");
    let err = sae::hub::fetch_from_hub("test-org/absent", "main", &["layers.0".into()])
        .unwrap_err()
        .to_string();
    std::env::remove_var("HF_TOKEN");
    assert!(
        err.contains(
            "no such repository or revision (or none that the token in use may see) (HTTP 404)"
        ),
        "{err}"
    );
    // A file the repository lacks is named with the repository and revision.
    let err = sae::hub::fetch_from_hub("test-org/saes", "main", &["layers.7".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hub repository 'test-org/saes' (revision 'main') has no layers.7/cfg.json"),
        "{err}"
    );
}

#[test]
fn partial_downloads_resume_or_are_discarded_and_gated_repositories_say_so() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let folder = common::model_folder(tmp.path(), 32, 64);
    let resumed = HubRepo::model_folder("test-org/resumed", "main", &folder);
    let mut gated = HubRepo::model_folder("test-org/gated", "main", &folder);
    gated.gated = true;
    let flaky = HubRepo::model_folder("test-org/flaky", "main", &folder);
    flaky.fail_first_resume.store(true, Ordering::SeqCst);
    // What interrupted runs leave in the cache's blobs folder, as hf-hub names it
    // (`<etag>.part`): a weight file as long as the file but never renamed (its bytes
    // wrong: kept, it became the cached weights), a config longer than the file (hf-hub
    // refused it as corrupted), and the first half of the tokenizer, to be resumed.
    let blobs = tmp
        .path()
        .join("hf-home/hub/models--test-org--resumed/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let part = |file: &str, bytes: Vec<u8>| {
        let etag = format!("{:016x}", fnv(&resumed.files[file]));
        std::fs::write(blobs.join(format!("{etag}.part")), bytes).unwrap();
    };
    let weights = resumed.files["model.safetensors"].clone();
    part("model.safetensors", vec![0; weights.len()]);
    part(
        "config.json",
        vec![b' '; resumed.files["config.json"].len() + 10],
    );
    let tokenizer = resumed.files["tokenizer.json"].clone();
    part("tokenizer.json", tokenizer[..tokenizer.len() / 2].to_vec());
    // A resumption that fails: hf-hub retries it from the first byte, appending.
    let flaky_blobs = tmp.path().join("hf-home/hub/models--test-org--flaky/blobs");
    std::fs::create_dir_all(&flaky_blobs).unwrap();
    let config = flaky.files["config.json"].clone();
    let etag = format!("{:016x}", fnv(&config));
    std::fs::write(
        flaky_blobs.join(format!("{etag}.part")),
        &config[..config.len() / 2],
    )
    .unwrap();
    let hub = MockHub::serve(vec![resumed, gated, flaky]);
    use_hub(&hub, &tmp.path().join("hf-home"));

    let downloaded = hooks::Model::load("test-org/resumed", &Default::default()).unwrap();
    let local = hooks::Model::load(folder.to_str().unwrap(), &Default::default()).unwrap();
    assert_eq!(logits(&downloaded), logits(&local));
    let cached = tmp.path().join("hf-home/hub/models--test-org--resumed");
    let commit = std::fs::read_to_string(cached.join("refs/main")).unwrap();
    let snapshot = cached.join("snapshots").join(commit.trim());
    assert_eq!(
        std::fs::read(snapshot.join("tokenizer.json")).unwrap(),
        tokenizer
    );
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).unwrap(),
        weights
    );
    // The half-downloaded tokenizer was resumed, not fetched again.
    let resumed_from = format!(
        "/test-org/resumed/resolve/main/tokenizer.json bytes={}-",
        tokenizer.len() / 2
    );
    let ranges = hub.ranges.lock().unwrap().clone();
    assert!(
        ranges.contains(&resumed_from),
        "{resumed_from} not in {ranges:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The too-long download is not kept; the next run fetches the file whole.
    let err = load_error("test-org/flaky", &Default::default());
    assert!(
        err.contains("config.json: the download came out")
            && err.contains(&format!("where the hub lists {}", config.len()))
            && err.contains("run again"),
        "{err}"
    );
    let again = hooks::Model::load("test-org/flaky", &Default::default()).unwrap();
    assert_eq!(logits(&again), logits(&local));

    // A gated repository: listed to anyone, its files refused, saying what to do.
    let err = load_error("test-org/gated", &Default::default());
    assert!(
        err.contains("test-org/gated") && err.contains("HTTP 401") && err.contains("HF_TOKEN"),
        "{err}"
    );
    std::env::set_var("HF_TOKEN", "hf_not_granted");
    let err = load_error("test-org/gated", &Default::default());
    std::env::remove_var("HF_TOKEN");
    assert!(
        err.contains("test-org/gated")
            && err.contains("HTTP 403")
            && err.contains("request access"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn a_partial_download_another_process_holds_is_left_alone() {
    use std::os::fd::AsRawFd;
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let folder = common::model_folder(tmp.path(), 32, 64);
    let repo = HubRepo::model_folder("test-org/locked", "main", &folder);
    // A full-length part of the config, and its lock held as hf-hub holds it while it
    // downloads (here by this test, standing for another process).
    let blobs = tmp
        .path()
        .join("hf-home/hub/models--test-org--locked/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let etag = format!("{:016x}", fnv(&repo.files["config.json"]));
    let part = blobs.join(format!("{etag}.part"));
    std::fs::write(&part, vec![b' '; repo.files["config.json"].len()]).unwrap();
    let lock = std::fs::File::create(blobs.join(format!("{etag}.lock"))).unwrap();
    // SAFETY: flock on a file this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let hub = MockHub::serve(vec![repo]);
    use_hub(&hub, &tmp.path().join("hf-home"));

    let err = load_error("test-org/locked", &Default::default());
    assert!(
        err.contains("config.json: another process is downloading this file")
            && err.contains(&format!("{etag}.lock")),
        "{err}"
    );
    assert!(part.exists(), "the part another process holds was deleted");

    drop(lock);
    let local = hooks::Model::load(folder.to_str().unwrap(), &Default::default()).unwrap();
    let downloaded = hooks::Model::load("test-org/locked", &Default::default()).unwrap();
    assert_eq!(logits(&downloaded), logits(&local));
}
