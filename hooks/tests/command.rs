//! The `hooks` binary as a process.

use std::path::Path;
use std::process::{Command, Stdio};

/// A reader that stops early (`hooks info ... | head -1`) ends the command quietly, by
/// SIGPIPE as other Unix tools, not with a panic in `println!`.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt_neox/pythia_style");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hooks"))
        .args(["info", "--model"])
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the command has loaded the model and printed anything.
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
