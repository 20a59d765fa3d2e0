//! Sparsify SAEs from the hub (`EleutherAI/sae-pythia-70m-32k`-style repos, one folder per
//! hook point) resolved through the shared Hugging Face cache: a fake cache laid out as
//! hf-hub writes it (`models--org--name/refs/main` -> `snapshots/<commit>/...`), offline.
//! One test function: it sets process-wide environment variables.

use std::path::Path;

use candle_core::Device;
use sae::hub::fetch_from_hub;
use sae::Sae;

#[test]
fn hub_sae_repos_resolve_from_the_cache_and_fail_clearly_offline() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--EleutherAI--sae-test");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sae/tiny");
    for hookpoint in ["layers.0", "layers.1.mlp"] {
        let dir = repo.join("snapshots").join(commit).join(hookpoint);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["cfg.json", "sae.safetensors"] {
            std::fs::copy(tiny.join(file), dir.join(file)).unwrap();
        }
    }
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let wanted = vec!["layers.0".to_string(), "layers.1.mlp".to_string()];
    let root = fetch_from_hub("EleutherAI/sae-test", "main", &wanted).unwrap();
    assert_eq!(root, repo.join("snapshots").join(commit));
    let sae = Sae::load(&root.join("layers.1.mlp"), &Device::Cpu).unwrap();
    assert_eq!((sae.d_in(), sae.num_latents()), (48, 192));

    // Offline and not cached: the message names the repo, revision, cache and file.
    let missing = vec!["layers.5".to_string()];
    let err = fetch_from_hub("EleutherAI/sae-test", "main", &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("EleutherAI/sae-test") && err.contains("main"),
        "{err}"
    );
    assert!(err.contains("layers.5/cfg.json"), "{err}");
    assert!(
        err.contains(&home.path().join("hub").display().to_string()),
        "{err}"
    );
    let err = fetch_from_hub("EleutherAI/sae-test", "v2", &wanted)
        .unwrap_err()
        .to_string();
    assert!(err.contains("v2"), "{err}");
    let err = fetch_from_hub("EleutherAI/sae-test", "main", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("hook points"), "{err}");

    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_HOME");
}
