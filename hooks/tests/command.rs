//! The `hooks` binary as a process.

use std::path::Path;
use std::process::{Command, Stdio};

/// A reader that stops early (`hooks inspect DIR | head -1`) ends the command quietly, by
/// SIGPIPE as other Unix tools, not with a panic in `println!`.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = tmp.path().join("model");
    let config = hooks::synthetic::tiny_gpt_neox_config(2);
    let tokenizer = repo.join("data/gpt-neox-20b-tokenizer.json");
    hooks::synthetic::write_synthetic_model(&model, &config, Some(&tokenizer)).unwrap();
    let cache = tmp.path().join("cache");
    let data = repo.join("data/wikitext-2-raw-test.txt");
    let args = [
        "hooks",
        "cache",
        "--hookpoints",
        "layers.0",
        "--seq-len",
        "32",
    ];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    for (flag, path) in [("--model", &model), ("--data", &data), ("--output", &cache)] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args.extend(["--max-tokens", "64"].map(String::from));
    hooks::cli::run(args).unwrap();

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
