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
                "{}: file not found",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner, eos_id))
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
