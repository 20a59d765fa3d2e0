//! Training checkpoints: named tensors plus a serialisable training state in one safetensors
//! file (the state as JSON in the header, or in a tensor when long), written atomically, so the
//! tensors and the state that describes them can never disagree after a crash. Used by the lens
//! and SAE trainers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};

use crate::{atomic, Error, Result};

fn bad(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("checkpoint {}: {message}", path.display()))
}

/// Writes `tensors` and `state` to `path` atomically.
pub fn save<S: Serialize>(path: &Path, tensors: Vec<(String, Tensor)>, state: &S) -> Result<()> {
    stage(path, tensors, state)?.commit()
}

/// [`save`], staged: written in full but not yet in place (see [`atomic::Staged`]), for
/// checkpoints that must change together.
pub fn stage<S: Serialize>(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    state: &S,
) -> Result<atomic::Staged> {
    // A checkpoint that a killed run was writing (optimiser state included, it can be GBs).
    atomic::remove_abandoned_temp_files_of(path);
    let json = serde_json::to_string(state).map_err(|e| bad(path, e))?;
    let mut tensors: Vec<(String, Vec<Tensor>)> =
        tensors.into_iter().map(|(n, t)| (n, vec![t])).collect();
    let metadata = if json.len() <= STATE_IN_HEADER_BYTES {
        BTreeMap::from([("state".to_string(), json)])
    } else {
        let bytes = json.into_bytes();
        let len = bytes.len();
        let state = Tensor::from_vec(bytes, len, &Device::Cpu)?;
        tensors.push((STATE_TENSOR.to_string(), vec![state]));
        BTreeMap::new()
    };
    atomic::stage_safetensors_with_metadata(path, &tensors, &metadata)
}

/// The largest training state kept as JSON in the file's header. A longer one (a long
/// run's step history) is stored as the bytes of tensor [`STATE_TENSOR`]: safetensors
/// readers refuse headers over 100 MB.
const STATE_IN_HEADER_BYTES: usize = 1 << 20;

/// The u8 tensor holding a training state too long for the header (see [`stage`]).
const STATE_TENSOR: &str = "__training_state_json__";

/// Puts staged checkpoints that must change together (see [`stage`]) in place so that a
/// kill at any moment leaves one step that every one of them has on disk: each current file
/// is first renamed `<name>.prev`, then the new files are moved in, then the `.prev` files
/// are deleted. [`recover_together`] puts that step's files back in place.
pub fn commit_together(staged: Vec<atomic::Staged>) -> Result<()> {
    for file in &staged {
        let current = file.path();
        if current.exists() {
            let prev = previous(current);
            std::fs::rename(current, &prev).map_err(|e| Error::io(&prev, e))?;
        }
    }
    // Every `.prev` on disk before any new file is: the checkpoints may be in several
    // folders, whose renames a file system need not keep in order.
    for file in &staged {
        atomic::sync_folder_of(file.path());
    }
    let paths: Vec<PathBuf> = staged.iter().map(|f| f.path().to_path_buf()).collect();
    for file in staged {
        file.commit()?;
    }
    remove_previous(&paths)
}

/// Makes checkpoints written by [`commit_together`] one step's before a run resumes from
/// `paths`, and says whether there is anything to resume (`false`: a new run). When all are
/// there, leftover `.prev` files are deleted; after a kill while they were being replaced,
/// the step before is put back in place (the newer files deleted, the `.prev` files renamed
/// back), each stage of which a kill may cut and a rerun redo. An error names the files when
/// some are missing.
pub fn recover_together(paths: &[PathBuf]) -> Result<bool> {
    if paths.iter().all(|p| p.is_file()) {
        remove_previous(paths)?;
        return Ok(true);
    }
    let has_previous: Vec<bool> = paths.iter().map(|p| previous(p).is_file()).collect();
    let found = (paths.iter().zip(&has_previous))
        .filter(|(p, &prev)| prev || p.is_file())
        .count();
    if found == 0 {
        return Ok(false);
    }
    if found < paths.len() || !has_previous.contains(&true) {
        let missing: Vec<String> = (paths.iter().zip(&has_previous))
            .filter(|(p, &prev)| !prev && !p.is_file())
            .map(|(p, _)| p.display().to_string())
            .collect();
        return Err(Error::InvalidArgument(format!(
            "only {found} of {} checkpoints exist (missing: {}): this run trains others than \
             the run that wrote them, or that run was stopped while writing its first ones, or \
             some were deleted; train what that run trained, use another output folder, or \
             delete the checkpoints folder to start again",
            paths.len(),
            missing.join(", ")
        )));
    }
    for (path, &prev) in paths.iter().zip(&has_previous) {
        if prev && path.exists() {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
    }
    for (path, &prev) in paths.iter().zip(&has_previous) {
        if prev {
            std::fs::rename(previous(path), path).map_err(|e| Error::io(path, e))?;
        }
    }
    Ok(true)
}

fn remove_previous(paths: &[PathBuf]) -> Result<()> {
    for prev in paths.iter().map(|p| previous(p)) {
        if prev.exists() {
            std::fs::remove_file(&prev).map_err(|e| Error::io(&prev, e))?;
        }
    }
    Ok(())
}

/// Where [`commit_together`] keeps a checkpoint's previous file while replacing it.
fn previous(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    path.with_file_name(name)
}

/// Reads a checkpoint written by [`save`]: its state and its tensors (on `device`).
pub fn load<S: DeserializeOwned>(
    path: &Path,
    device: &Device,
) -> Result<(S, HashMap<String, Tensor>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e))?;
    let in_header = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("state"))
        .cloned();
    let mut tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(path, e))?;
    let json = match (in_header, tensors.remove(STATE_TENSOR)) {
        (Some(json), _) => json,
        (None, Some(stored)) => String::from_utf8(stored.to_vec1::<u8>()?)
            .map_err(|e| bad(path, format!("the training state is not text: {e}")))?,
        (None, None) => return Err(bad(path, "no training state in the header")),
    };
    let state = serde_json::from_str(&json).map_err(|e| bad(path, e))?;
    Ok((state, tensors))
}

/// Refuses to train into a folder that already holds `artefact` (a trained SAE's `cfg.json`,
/// a lens's `config.json`) when no checkpoint at `checkpoint` accounts for it: it is the
/// result of another run, which this one would silently replace.
pub fn check_output_free(artefact: &Path, checkpoint: &Path) -> Result<()> {
    if artefact.exists() && !checkpoint.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists but {} does not: the folder holds the result of another run; choose another output folder or delete it",
            artefact.display(),
            checkpoint.display()
        )));
    }
    Ok(())
}

/// Refuses to resume a checkpoint of a run that read `saved` (an
/// [`crate::activations::ActivationSource::describe`]) in a run that reads `now`: the two
/// would mix, say, two models' activations. Empty descriptions (unknown, or a checkpoint from
/// before they were recorded) are not checked, and one recorded before details in
/// parentheses were added to its end (a cache's shuffle buffer, the dtypes) is checked
/// without them: such a checkpoint resumes in any dtype.
pub fn check_source(saved: &str, now: &str) -> std::result::Result<(), String> {
    let older = now
        .strip_prefix(saved)
        .is_some_and(|detail| detail.starts_with(" (") && detail.ends_with(')'));
    if saved.is_empty() || now.is_empty() || saved == now || older {
        return Ok(());
    }
    // Streamed data is shuffled since 2026-12-02: a run from before read it in data order.
    let hint =
        match now.contains(", shuffled with seed ") && !saved.contains(", shuffled with seed ") {
            true => " (a run begun in data order resumes with --shuffle-sequences 1)",
            false => "",
        };
    Err(format!(
        "was trained on {saved}, but this run reads {now}{hint}; use another output folder or delete the checkpoint"
    ))
}

/// Refuses to resume a job whose data fingerprint (of the tokens it had read, as
/// [`crate::data::ChunkStream::fingerprint_after`] gives it) is not this run's over the same
/// stretch: the data files changed, or others were given. The error says so, for the caller
/// to prefix with the job's file and suffix with what to do. Unknown fingerprints (a job from
/// before they were recorded, a source that cannot tell) are not checked.
pub fn check_data(saved: Option<&str>, now: Option<&str>) -> std::result::Result<(), String> {
    match (saved, now) {
        (Some(saved), Some(now)) if saved != now => Err(format!(
            "was made from other data: the tokens it read have fingerprint {saved}, the same stretch of this run's data {now} (the data files changed, or others were given)"
        )),
        _ => Ok(()),
    }
}

/// [`check_data`] for the training checkpoint at `path`: the message names it and says what
/// to do.
pub fn check_checkpoint_data(
    path: &Path,
    saved: Option<&str>,
    now: Option<&str>,
) -> std::result::Result<(), String> {
    check_data(saved, now).map_err(|m| {
        format!(
            "checkpoint {}: {m}; use the original data, another output folder, or delete the checkpoint",
            path.display()
        )
    })
}

/// The fields in which `saved` (a checkpoint's settings) and `now` (this run's) differ, as
/// `name: saved -> now` (nested fields dotted), for an error that says what to change. Both
/// must serialise to JSON objects; anything else is compared whole.
pub fn differences<S: Serialize>(saved: &S, now: &S) -> String {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let null = serde_json::Value::Null;
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(
                        &name,
                        a.get(key).unwrap_or(&null),
                        b.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            (a, b) if a != b => out.push(format!("{prefix}: {a} -> {b}")),
            _ => {}
        }
    }
    // Through text, so that an f32 shows as written (0.7), not widened (0.699999988079071).
    let value = |s: &S| {
        serde_json::to_string(s)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let mut out = Vec::new();
    walk("", &value(saved), &value(now), &mut out);
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Checkpoints replaced together are recovered at one step wherever a kill stops the
    /// replacement, or the recovery itself.
    #[test]
    fn checkpoints_replaced_together_recover_at_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = ["a", "b"]
            .map(|n| dir.path().join(n).join("checkpoint.safetensors"))
            .into();
        for path in &paths {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        }
        assert!(!recover_together(&paths).unwrap());
        let commit = |step: &str| {
            let staged = paths
                .iter()
                .map(|p| atomic::stage_with(p, |w| w.write_all(step.as_bytes())).unwrap())
                .collect();
            commit_together(staged).unwrap();
        };
        // The steps of the recovered files; no `.prev` file is left.
        let recovered = || -> Vec<String> {
            assert!(recover_together(&paths).unwrap());
            assert!(paths.iter().all(|p| !previous(p).exists()));
            paths
                .iter()
                .map(|p| std::fs::read_to_string(p).unwrap())
                .collect()
        };
        commit("1");
        commit("2");
        assert_eq!(recovered(), ["2", "2"]);
        let (a, b) = (&paths[0], &paths[1]);
        // What `commit_together` does to replace step 2 by step 3, one file at a time.
        let replace: [&dyn Fn(); 6] = [
            &|| std::fs::rename(a, previous(a)).unwrap(),
            &|| std::fs::rename(b, previous(b)).unwrap(),
            &|| std::fs::write(a, "3").unwrap(),
            &|| std::fs::write(b, "3").unwrap(),
            &|| std::fs::remove_file(previous(a)).unwrap(),
            &|| std::fs::remove_file(previous(b)).unwrap(),
        ];
        for killed_after in 0..=replace.len() {
            commit("2");
            replace[..killed_after].iter().for_each(|op| op());
            let expected = if killed_after >= 4 { "3" } else { "2" };
            assert_eq!(
                recovered(),
                [expected, expected],
                "killed after {killed_after}"
            );
        }
        // A kill in the recovery: after it deleted the newer file, or moved one file back.
        commit("2");
        replace[..3].iter().for_each(|op| op());
        std::fs::remove_file(a).unwrap();
        assert_eq!(recovered(), ["2", "2"]);
        commit("2");
        replace[..3].iter().for_each(|op| op());
        std::fs::remove_file(a).unwrap();
        std::fs::rename(previous(a), a).unwrap();
        assert_eq!(recovered(), ["2", "2"]);
        // Killed again in the next replacement after a recovery: still one step.
        replace[..3].iter().for_each(|op| op());
        assert_eq!(recovered(), ["2", "2"]);
        // A checkpoint gone altogether is refused, by name, and nothing is changed.
        std::fs::remove_file(b).unwrap();
        let err = recover_together(&paths).unwrap_err().to_string();
        let missing = format!("only 1 of 2 checkpoints exist (missing: {}):", b.display());
        assert!(err.contains(&missing), "{err}");
        assert_eq!(std::fs::read_to_string(a).unwrap(), "2");
    }

    #[test]
    fn a_stream_in_data_order_is_told_how_to_resume() {
        let before = "model m in sequences of 64 tokens (computed in float32)";
        let now = "model m in sequences of 64 tokens, shuffled with seed 42 among 1024 sequences \
                   (computed in float32)";
        let err = check_source(before, now).unwrap_err();
        assert!(err.contains("resumes with --shuffle-sequences 1"), "{err}");
        let err = check_source(now, before).unwrap_err();
        assert!(!err.contains("--shuffle-sequences"), "{err}");
    }

    #[test]
    fn sources_match_whole_or_without_a_later_detail() {
        let now = "a cache read shuffled with seed 5 (in a buffer of 64 tokens)";
        check_source(now, now).unwrap();
        check_source("a cache read shuffled with seed 5", now).unwrap();
        check_source("", now).unwrap();
        for other in [
            "a cache read shuffled with seed 5 (in a buffer of 32 tokens)",
            "a cache read shuffled with seed 55 (in a buffer of 64 tokens)",
            "a cache read shuffled with seed",
        ] {
            assert!(check_source(other, now).is_err(), "{other}");
        }
        assert!(check_source(now, "a cache read shuffled with seed 5").is_err());
        // The dtypes, added later still: in the same run's description, another dtype is
        // another source; a description from before them is taken as it is.
        let typed = format!("{now} (computed in float32, stored in float16)");
        check_source(now, &typed).unwrap();
        check_source("a cache read shuffled with seed 5", &typed).unwrap();
        let bf16 = typed.replace("computed in float32", "computed in bfloat16");
        assert!(check_source(&bf16, &typed).is_err());
        let stream = "model m in sequences of 64 tokens";
        check_source(stream, &format!("{stream} (computed in float32)")).unwrap();
        let f32_stream = format!("{stream} (computed in float32)");
        assert!(check_source(&f32_stream, &format!("{stream} (computed in bfloat16)")).is_err());
    }

    #[test]
    fn differences_name_the_fields() {
        let saved = serde_json::json!({"steps": 250, "lr": 1.0, "inner": {"k": 4, "on": true}});
        let now = serde_json::json!({"steps": 12, "lr": 1.0, "inner": {"k": 4, "on": false}});
        assert_eq!(
            differences(&saved, &now),
            "inner.on: true -> false, steps: 250 -> 12"
        );
        assert_eq!(differences(&saved, &saved), "");
        assert_eq!(differences(&[0.7f32], &[0.25f32]), ": [0.7] -> [0.25]");
    }

    #[test]
    fn round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        // What a killed run left while writing its checkpoint goes with the next save.
        let abandoned = dir.path().join(".c.safetensors.tmp-123");
        crate::atomic::tests::write_stale(&abandoned, b"half a checkpoint");
        let t = Tensor::new(&[1f32, 2.5], &Device::Cpu).unwrap();
        save(&path, vec![("w".into(), t)], &vec![0.1f64, 7.0]).unwrap();
        #[cfg(unix)]
        assert!(!abandoned.exists());
        let (state, tensors): (Vec<f64>, _) = load(&path, &Device::Cpu).unwrap();
        assert_eq!(state, vec![0.1, 7.0]);
        assert_eq!(tensors["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.5]);
        std::fs::write(&path, b"garbage").unwrap();
        let err = load::<Vec<f64>>(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.safetensors"), "{err}");
    }

    /// A state too long for the header (a long run's history: safetensors readers refuse
    /// headers over 100 MB) goes into a tensor, and comes back the same.
    #[test]
    fn long_states_round_trip_outside_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let state: Vec<f64> = (0..200_000).map(|i| i as f64 / 3.0).collect();
        let t = Tensor::new(&[1f32, 2.5], &Device::Cpu).unwrap();
        save(&path, vec![("w".into(), t)], &state).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert!(header < 1000, "header of {header} bytes");
        let (loaded, tensors): (Vec<f64>, _) = load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded, state);
        assert_eq!(tensors.keys().collect::<Vec<_>>(), ["w"]);
    }
}
