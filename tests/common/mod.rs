//! Helpers shared by the end-to-end test binaries.

use std::path::{Path, PathBuf};

/// The repository (fixtures, data): `$EI_REPO` where a test binary runs away from its build
/// folder (bench/gpu.sh on the GPU machine), else the folder it was built in.
pub fn repo() -> PathBuf {
    std::env::var_os("EI_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())
}

/// A 3-layer GPT-NeoX folder `dir/model` with synthetic weights of width `hidden` (MLP width
/// `intermediate`) and the real Pythia tokenizer.
pub fn model_folder(dir: &Path, hidden: usize, intermediate: usize) -> PathBuf {
    let model = dir.join("model");
    let config = serde_json::json!({
        "model_type": "gpt_neox", "hidden_size": hidden, "num_hidden_layers": 3,
        "num_attention_heads": 4, "intermediate_size": intermediate, "vocab_size": 50304,
        "eos_token_id": 0
    });
    hooks::synthetic::write_synthetic_model(
        &model,
        &config,
        Some(&repo().join("data/gpt-neox-20b-tokenizer.json")),
    )
    .unwrap();
    model
}
