//! `scripts/prune-stale-binaries` (run by `.ci/run` after each build) deletes only the
//! executables cargo no longer reports, and nothing when cargo's listing cannot be trusted.
//! A fake `cargo` on PATH prints the listing, so no build is needed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/prune-stale-binaries");

/// A profile folder with `deps/` and `examples/`, and a folder for the fake cargo.
struct Layout {
    _root: tempfile::TempDir,
    profile: PathBuf,
    bin: PathBuf,
}

impl Layout {
    fn new() -> Layout {
        let root = tempfile::tempdir().unwrap();
        let profile = root.path().join("debug");
        let bin = root.path().join("bin");
        for folder in [profile.join("deps"), profile.join("examples"), bin.clone()] {
            fs::create_dir_all(folder).unwrap();
        }
        Layout {
            _root: root,
            profile,
            bin,
        }
    }

    /// A file at `relative` under the profile folder, executable or not, last changed an
    /// hour ago (linked before the script started).
    fn file(&self, relative: &str, executable: bool) -> PathBuf {
        let path = self.profile.join(relative);
        fs::write(&path, b"\x7fELF").unwrap();
        let mode = if executable { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        path
    }

    /// Installs a `cargo` that prints one compiler-artifact message per path in `current`
    /// and exits with `status`.
    fn fake_cargo(&self, current: &[&Path], status: i32) {
        let mut script = String::from("#!/bin/sh\necho 'Compiling...' >&2\n");
        for path in current {
            let message = serde_json::json!({
                "reason": "compiler-artifact",
                "executable": path,
                "filenames": [path],
            });
            script += &format!("echo '{message}'\n");
        }
        script += "echo '{\"reason\":\"build-finished\",\"success\":true}'\n";
        script += &format!("exit {status}\n");
        let cargo = self.bin.join("cargo");
        fs::write(&cargo, script).unwrap();
        fs::set_permissions(&cargo, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Runs the script on the profile folder; returns its stdout and stderr.
    fn prune(&self) -> String {
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap());
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg(&self.profile)
            .args(["test", "--no-run"])
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

#[test]
fn removes_only_executables_cargo_no_longer_reports() {
    let layout = Layout::new();
    let current = layout.file("deps/model-0123456789abcdef", true);
    // The uplifted copy (target/debug/NAME) is a hard link of the current one: cargo may
    // report either name.
    let uplifted = layout.profile.join("model");
    fs::hard_link(&current, &uplifted).unwrap();
    let current_example = layout.file("examples/walk-1111111111111111", true);
    let stale = layout.file("deps/model-fedcba9876543210", true);
    fs::write(stale.with_extension("d"), "deps").unwrap();
    let stale_example = layout.file("examples/walk-2222222222222222", true);
    let kept = [
        layout.file("deps/libhooks-3333333333333333.rlib", false),
        layout.file("deps/model-4444444444444444.d", false),
        layout.file("deps/notes-5555555555555555", false),
    ];
    // Linked after the script started (a cargo running beside it): kept.
    let fresh = layout.file("deps/other-6666666666666666", true);
    fs::File::options()
        .write(true)
        .open(&fresh)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();

    layout.fake_cargo(&[&uplifted, &current_example], 0);
    let log = layout.prune();
    assert!(
        log.contains("== pruned 0 MiB of stale executables"),
        "{log}"
    );
    for path in [&current, &current_example, &fresh, &uplifted]
        .into_iter()
        .chain(&kept)
    {
        assert!(path.exists(), "{} was removed\n{log}", path.display());
    }
    for path in [&stale, &stale.with_extension("d"), &stale_example] {
        assert!(!path.exists(), "{} was kept\n{log}", path.display());
    }
}

#[test]
fn removes_nothing_when_cargo_fails_or_lists_nothing() {
    let layout = Layout::new();
    let stale = layout.file("deps/model-fedcba9876543210", true);
    let current = layout.file("deps/model-0123456789abcdef", true);

    layout.fake_cargo(&[&current], 101);
    let log = layout.prune();
    assert!(log.contains("failed; nothing removed"), "{log}");
    assert!(stale.exists());

    layout.fake_cargo(&[], 0);
    let log = layout.prune();
    assert!(
        log.contains("cargo reported no artefacts; nothing removed"),
        "{log}"
    );
    assert!(stale.exists());

    // A listing of files that do not exist is no listing either.
    layout.fake_cargo(&[&layout.profile.join("deps/gone-7777777777777777")], 0);
    let log = layout.prune();
    assert!(log.contains("nothing removed"), "{log}");
    assert!(stale.exists() && current.exists());
}
