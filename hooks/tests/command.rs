//! The `hooks` binary as a process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `hooks cache` arguments for 64 WikiText tokens of a two-layer synthetic model written
/// under `dir` (with `max_position_embeddings` in its config when given).
fn cache_args(
    dir: &Path,
    max_positions: Option<usize>,
    seq_len: usize,
    cache: &Path,
) -> Vec<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = dir.join("model");
    let mut config = hooks::synthetic::tiny_gpt_neox_config(2);
    if let Some(max) = max_positions {
        config["max_position_embeddings"] = max.into();
    }
    let tokenizer = repo.join("data/gpt-neox-20b-tokenizer.json");
    hooks::synthetic::write_synthetic_model(&model, &config, Some(&tokenizer)).unwrap();
    let data: PathBuf = repo.join("data/wikitext-2-raw-test.txt");
    let mut args: Vec<String> = [
        "hooks",
        "cache",
        "--hookpoints",
        "layers.0",
        "--max-tokens",
        "64",
    ]
    .map(String::from)
    .into();
    args.extend(["--seq-len".into(), seq_len.to_string()]);
    for (flag, path) in [
        ("--model", &model),
        ("--data", &data),
        ("--output", &cache.to_path_buf()),
    ] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args
}

/// Sequences longer than the model's trained context run, with one warning that says so.
#[test]
fn sequences_past_the_trained_context_are_warned_about_once() {
    let stderr_of = |max_positions, seq_len| {
        let tmp = tempfile::tempdir().unwrap();
        let args = cache_args(
            tmp.path(),
            Some(max_positions),
            seq_len,
            &tmp.path().join("cache"),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_hooks"))
            .args(&args[1..])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let past = stderr_of(16, 32);
    assert_eq!(past.matches("longer than").count(), 1, "{past}");
    assert!(
        past.contains("sequences of 32 tokens") && past.contains("max_position_embeddings 16"),
        "{past}"
    );
    let within = stderr_of(32, 32);
    assert!(!within.contains("longer than"), "{within}");
}

/// A reader that stops early (`hooks inspect DIR | head -1`) ends the command quietly, by
/// SIGPIPE as other Unix tools, not with a panic in `println!`.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    hooks::cli::run(cache_args(tmp.path(), None, 32, &cache)).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_hooks"))
        .arg("inspect")
        .arg(&cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the command has opened the cache and printed anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
        "{:?}: {stderr}",
        out.status
    );
}

/// `hooks generate` prints what transformers' greedy `generate` adds to the prompt
/// (`tests/fixtures/smollm2/generation.json`). `--quantized` runs the file's quantized
/// weights (with float32 only).
#[test]
fn generate_prints_the_greedy_continuation() {
    let gguf = match hooks::fetch::smollm2_gguf() {
        Ok(path) => path,
        Err(e) if hooks::fetch::may_skip(&e) => {
            eprintln!("SKIP hooks generate: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2/generation.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hooks"))
        .args(["generate", "--model", gguf.to_str().unwrap(), "--prompt"])
        .arg(fixture["prompt"].as_str().unwrap())
        .args(["--max-new-tokens", "16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "{}\n",
            fixture["plain"]["generated_decoded"].as_str().unwrap()
        )
    );

    let quantized = |dtype: &str| {
        Command::new(env!("CARGO_BIN_EXE_hooks"))
            .args(["generate", "--model", gguf.to_str().unwrap(), "--quantized"])
            .args(["--dtype", dtype, "--max-new-tokens", "4", "--prompt"])
            .arg(fixture["prompt"].as_str().unwrap())
            .output()
            .unwrap()
    };
    let out = quantized("float32");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!String::from_utf8(out.stdout).unwrap().trim().is_empty());
    let out = quantized("bfloat16");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("f32 activations, not BF16"), "{stderr}");
}

/// Help, version and argument errors: printed where a command line prints them, with its
/// exit status (0, 0, 2), and `hooks::cli::run` returns them instead of ending the process.
#[test]
fn help_version_and_argument_errors_have_their_exit_status() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hooks"))
            .args(args)
            .output()
            .unwrap()
    };
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("inspect"));
    let version = run(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("hooks "));
    let bad = run(&["cache", "--bogus"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--bogus") && stderr.contains("Usage:"),
        "{stderr}"
    );
    assert!(bad.stdout.is_empty());

    let error = hooks::cli::run(["hooks", "cache", "--bogus"]).unwrap_err();
    assert!(
        error.downcast_ref::<hooks::cli::NotRun>().is_some(),
        "{error:#}"
    );
}
