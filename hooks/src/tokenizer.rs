//! The model's tokenizer (Hugging Face `tokenizers`), plus the end-of-text id used to
//! separate documents.

use std::path::Path;

use crate::{Error, Result};

/// A loaded tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

/// Spellings of the end-of-text token, tried in order when the config names no id.
const EOS_TOKENS: [&str; 4] = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"];

impl Tokenizer {
    /// Loads a `tokenizer.json`; `eos_id` overrides the end-of-text token id.
    pub fn from_file(path: &Path, eos_id: Option<u32>) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Tokenizer(format!(
                "{}: {}",
                path.display(),
                crate::error::not_a_file(path)
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner, eos_id))
    }

    /// The tokenizer of a model named as [`crate::Model::load`] takes it (short name, hub id
    /// at `revision`, folder, `.gguf` file), without its weights: the `tokenizer.json` of a
    /// folder or hub repository, with the EOS id of its `config.json` (downloaded alone when
    /// not cached), or the tokenizer a GGUF file's metadata describes. `replacement`, a
    /// `tokenizer.json`, is used instead of the model's own, with the model's EOS id.
    pub fn for_model(
        name: &str,
        revision: Option<&str>,
        replacement: Option<&Path>,
    ) -> Result<Self> {
        use crate::source::ModelSpec;
        let from_files = |config: &Path, own: &Path| {
            let eos_id = crate::config::ModelConfig::from_file(config)?.eos_token_id();
            Self::from_file(replacement.unwrap_or(own), eos_id)
        };
        match ModelSpec::parse(name, revision)? {
            ModelSpec::Folder(dir) => {
                let own = dir.join("tokenizer.json");
                if replacement.is_none() && !own.is_file() {
                    return Err(Error::Tokenizer(format!(
                        "{}: missing (the model folder has no tokenizer; give a tokenizer.json separately)",
                        own.display()
                    )));
                }
                from_files(&dir.join("config.json"), &own)
            }
            ModelSpec::Hub { repo_id, revision } => {
                let mut names = vec!["config.json".to_string()];
                if replacement.is_none() {
                    names.push("tokenizer.json".to_string());
                }
                let paths = crate::source::hub_repo_files(&repo_id, &revision, &names)?;
                from_files(&paths[0], paths.last().expect("config.json at least"))
            }
            ModelSpec::Gguf(path) => match replacement {
                Some(file) => Self::from_file(file, crate::gguf::read_eos_id(&path)?),
                None => crate::gguf::read_tokenizer(&path)?.ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "{}: has no tokenizer this crate can rebuild (needs tokenizer.ggml.model = gpt2); give a tokenizer.json separately",
                        path.display()
                    ))
                }),
            },
        }
    }

    /// Wraps a tokenizer built elsewhere (e.g. from GGUF metadata).
    pub fn new(inner: tokenizers::Tokenizer, eos_id: Option<u32>) -> Self {
        let eos_id = eos_id.or_else(|| EOS_TOKENS.iter().find_map(|t| inner.token_to_id(t)));
        Tokenizer { inner, eos_id }
    }

    /// Token ids of `text`, without special tokens added (documents are joined with EOS
    /// explicitly by the data pipeline).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    /// Token ids of `text`; `special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, special)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of token ids (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of token ids, special tokens left out when `skip_special` (ids outside the
    /// vocabulary are an error, naming the first).
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        // The tokenizers crate drops unknown ids silently.
        if let Some((at, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| self.inner.id_to_token(id).is_none())
        {
            return Err(Error::TokenOutOfRange {
                token: i64::from(*id),
                position: at,
                vocab_size: self.vocab_size(),
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// The string of one token id, as the vocabulary spells it decoded.
    pub fn token_text(&self, id: u32) -> Result<String> {
        self.decode(&[id])
    }

    /// The end-of-text id, if known.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
