//! Our tokenizer wrapper against token ids from the Python `tokenizers` / transformers
//! tokenizer on real text, code, whitespace runs and Unicode (tests/fixtures/tokenizer).

use std::path::Path;

use hooks::Tokenizer;

#[test]
fn gpt_neox_tokenizer_matches_python_ids() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tokenizer =
        Tokenizer::from_file(&repo.join("data/gpt-neox-20b-tokenizer.json"), None).unwrap();
    assert_eq!(tokenizer.eos_id(), Some(0), "<|endoftext|> is the EOS");
    let fixture =
        std::fs::read_to_string(repo.join("tests/fixtures/tokenizer/gpt_neox_20b.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&fixture).unwrap();
    assert!(cases.len() >= 25);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tokenizer.encode_with(text, true).unwrap(),
            expected,
            "{name}"
        );
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            expected,
            "{name}: no special tokens are added"
        );
        let decoded = tokenizer.decode(&expected).unwrap();
        assert_eq!(
            decoded,
            case["decoded_keep_special"].as_str().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn missing_or_broken_tokenizer_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_file(&dir.path().join("tokenizer.json"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json: file not found"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = Tokenizer::from_file(&dir.path().join("tokenizer.json"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("tokenizer: ") && err.contains("tokenizer.json"),
        "{err}"
    );
}
