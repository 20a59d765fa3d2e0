//! Training checkpoints: named tensors plus a serialisable training state in one safetensors
//! file (the state as JSON in the header), written atomically, so the tensors and the state
//! that describes them can never disagree after a crash. Used by the lens and SAE trainers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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
    let metadata = BTreeMap::from([("state".to_string(), json)]);
    let tensors: Vec<(String, Vec<Tensor>)> =
        tensors.into_iter().map(|(n, t)| (n, vec![t])).collect();
    atomic::stage_safetensors_with_metadata(path, &tensors, &metadata)
}

/// Puts staged checkpoints that must change together (see [`stage`]) in place so that a
/// kill at any moment leaves one step that every one of them has on disk: each current file
/// is first renamed `<name>.prev`, then the new files are moved in, then the `.prev` files
/// are deleted. [`to_resume_together`] finds that step's files.
pub fn commit_together(staged: Vec<atomic::Staged>) -> Result<()> {
    for file in &staged {
        let current = file.path();
        if current.exists() {
            let prev = previous(current);
            std::fs::rename(current, &prev).map_err(|e| Error::io(&prev, e))?;
        }
    }
    let paths: Vec<std::path::PathBuf> = staged.iter().map(|f| f.path().to_path_buf()).collect();
    for file in staged {
        file.commit()?;
    }
    for path in paths {
        let prev = previous(&path);
        if prev.exists() {
            std::fs::remove_file(&prev).map_err(|e| Error::io(&prev, e))?;
        }
    }
    Ok(())
}

/// The files to resume checkpoints written by [`commit_together`] from, all at one step:
/// the checkpoints themselves when each is in place, else, for a run killed while they were
/// being replaced, each one's `.prev` where it has one (the step before). `None` when there
/// are none (a new run); an error naming the files when some are missing.
pub fn to_resume_together(paths: &[std::path::PathBuf]) -> Result<Option<Vec<std::path::PathBuf>>> {
    if paths.iter().all(|p| p.is_file()) {
        return Ok(Some(paths.to_vec()));
    }
    let chosen: Vec<Option<std::path::PathBuf>> = paths
        .iter()
        .map(|path| {
            let prev = previous(path);
            [prev, path.clone()].into_iter().find(|p| p.is_file())
        })
        .collect();
    let found = chosen.iter().flatten().count();
    if found == 0 {
        return Ok(None);
    }
    if found < paths.len() {
        return Err(Error::InvalidArgument(format!(
            "only {found} of {} checkpoints exist ({}); cannot resume them together: delete \
             the checkpoints folder to start again",
            paths.len(),
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(Some(chosen.into_iter().flatten().collect()))
}

/// Where [`commit_together`] keeps a checkpoint's previous file while replacing it.
fn previous(path: &Path) -> std::path::PathBuf {
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
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("state"))
        .ok_or_else(|| bad(path, "no training state in the header"))?;
    let state = serde_json::from_str(json).map_err(|e| bad(path, e))?;
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(path, e))?;
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
/// before they were recorded) are not checked.
pub fn check_source(saved: &str, now: &str) -> std::result::Result<(), String> {
    if saved.is_empty() || now.is_empty() || saved == now {
        return Ok(());
    }
    Err(format!(
        "was trained on {saved}, but this run reads {now}; use another output folder or delete the checkpoint"
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

    /// Checkpoints replaced together can be resumed together wherever a kill stops the
    /// replacement: each disk state [`commit_together`] passes through gives files of one step.
    #[test]
    fn checkpoints_replaced_together_resume_at_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<std::path::PathBuf> = ["a", "b"]
            .map(|n| dir.path().join(n).join("checkpoint.safetensors"))
            .into();
        for path in &paths {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        }
        assert_eq!(to_resume_together(&paths).unwrap(), None);
        let write_step = |step: &str| {
            let staged = paths
                .iter()
                .map(|p| atomic::stage_with(p, |w| w.write_all(step.as_bytes())).unwrap())
                .collect();
            commit_together(staged).unwrap();
        };
        let steps = |files: Option<Vec<std::path::PathBuf>>| -> Vec<String> {
            files
                .unwrap()
                .iter()
                .map(|p| std::fs::read_to_string(p).unwrap())
                .collect()
        };
        write_step("1");
        write_step("2");
        assert_eq!(steps(to_resume_together(&paths).unwrap()), ["2", "2"]);
        assert!(!previous(&paths[0]).exists() && !previous(&paths[1]).exists());
        let (a, b) = (&paths[0], &paths[1]);
        let put = |path: &Path, step: &str| std::fs::write(path, step).unwrap();
        let gone = |path: &Path| std::fs::remove_file(path).unwrap();
        // Killed while moving the current files aside: a's moved, b's not yet.
        std::fs::rename(a, previous(a)).unwrap();
        assert_eq!(steps(to_resume_together(&paths).unwrap()), ["2", "2"]);
        // Killed while moving the new ones in: a's in, b's not yet.
        put(a, "3");
        std::fs::rename(b, previous(b)).unwrap();
        assert_eq!(steps(to_resume_together(&paths).unwrap()), ["2", "2"]);
        // Killed while deleting the previous ones: a's deleted, b's not yet.
        put(b, "3");
        gone(&previous(a));
        assert_eq!(steps(to_resume_together(&paths).unwrap()), ["3", "3"]);
        // One checkpoint gone altogether is refused, by name.
        gone(&previous(b));
        gone(b);
        let err = to_resume_together(&paths).unwrap_err().to_string();
        assert!(err.contains("only 1 of 2 checkpoints exist"), "{err}");
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
}
