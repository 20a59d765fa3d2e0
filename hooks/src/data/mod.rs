//! Datasets to fixed-length token chunks.
//!
//! Text (`.txt`, one document per non-empty line, or the whole file as one document), JSON
//! lines (`.jsonl`, a text field per line) and parquet (a text column) are tokenized, each
//! document preceded by EOS, packed into chunks of `seq_len` tokens, and the last partial
//! chunk is dropped: the convention of tuned-lens and sparsify (`chunk_and_tokenize`).
//! Pre-tokenized arrays (`.npy`, raw uint16 `.bin`) are chunked as they are.
//! Everything streams: memory does not grow with the dataset.

mod npy;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

pub use npy::{write_npy, TokenArray, TokenFileSummary};

use crate::{Error, Result, Tokenizer};

/// How a dataset file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// Plain text, one document per non-empty line.
    TextLines,
    /// Plain text, the whole file one document.
    TextFile,
    /// JSON lines with a text field.
    Jsonl,
    /// Parquet with a text column.
    Parquet,
    /// NumPy array of token ids.
    Npy,
    /// Raw little-endian uint16 token ids.
    Bin,
}

impl DataFormat {
    /// Guesses the format from a file extension.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" | "md" | "raw" => Ok(DataFormat::TextLines),
            "jsonl" | "json" | "ndjson" => Ok(DataFormat::Jsonl),
            "parquet" => Ok(DataFormat::Parquet),
            "npy" => Ok(DataFormat::Npy),
            "bin" => Ok(DataFormat::Bin),
            _ => Err(Error::Data {
                path: path.into(),
                message: format!(
                    "cannot tell the format from the extension '.{ext}' (use .txt, .jsonl, .parquet, .npy or .bin, or give the format explicitly)"
                ),
            }),
        }
    }

    /// Parses a format name: `text`, `text-file`, `jsonl`, `parquet`, `npy`, `bin`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "text" | "txt" | "lines" => Ok(DataFormat::TextLines),
            "text-file" | "file" => Ok(DataFormat::TextFile),
            "jsonl" | "json" => Ok(DataFormat::Jsonl),
            "parquet" => Ok(DataFormat::Parquet),
            "npy" => Ok(DataFormat::Npy),
            "bin" => Ok(DataFormat::Bin),
            other => Err(Error::InvalidArgument(format!(
                "unknown data format '{other}' (expected text, text-file, jsonl, parquet, npy or bin)"
            ))),
        }
    }

    fn is_pretokenized(self) -> bool {
        matches!(self, DataFormat::Npy | DataFormat::Bin)
    }
}

/// A dataset: files, their format and how to chunk them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataSpec {
    /// Dataset files, read in order.
    pub paths: Vec<PathBuf>,
    /// Format name (see [`DataFormat::parse`]); guessed from each file's extension when `None`.
    pub format: Option<String>,
    /// Field or column holding the text (JSON lines, parquet).
    pub text_field: String,
    /// Tokens per chunk.
    pub seq_len: usize,
}

impl DataSpec {
    /// A spec with the default text field (`text`) and guessed formats.
    pub fn new(paths: Vec<PathBuf>, seq_len: usize) -> Self {
        DataSpec {
            paths,
            format: None,
            text_field: "text".into(),
            seq_len,
        }
    }

    fn format_of(&self, path: &Path) -> Result<DataFormat> {
        match &self.format {
            Some(name) => DataFormat::parse(name),
            None => DataFormat::from_path(path),
        }
    }

    /// Checks what can be checked before a model is loaded: a positive sequence length, and
    /// files that exist, have UTF-8 names and a known format.
    pub fn check(&self) -> Result<()> {
        if self.seq_len == 0 {
            return Err(Error::InvalidArgument(
                "sequence length must be positive".into(),
            ));
        }
        if self.paths.is_empty() {
            return Err(Error::InvalidArgument("no dataset files given".into()));
        }
        for path in &self.paths {
            if !path.is_file() {
                return Err(Error::Data {
                    path: path.clone(),
                    message: crate::error::not_a_file(path).into(),
                });
            }
            if path.to_str().is_none() {
                return Err(Error::Data {
                    path: path.clone(),
                    message: "its name is not valid UTF-8; rename it (caches and checkpoints \
                              record the data's paths as text)"
                        .into(),
                });
            }
            self.format_of(path)?;
        }
        Ok(())
    }

    /// Opens the dataset as a stream of chunks. Text formats need a tokenizer with an EOS id.
    pub fn chunks(&self, tokenizer: Option<&Tokenizer>) -> Result<ChunkStream> {
        self.check()?;
        let mut sources = VecDeque::new();
        for path in &self.paths {
            let format = self.format_of(path)?;
            if !format.is_pretokenized() && tokenizer.and_then(Tokenizer::eos_id).is_none() {
                let why = match tokenizer {
                    None => "the model has no tokenizer (no tokenizer.json beside its config; pass --tokenizer, or give pre-tokenized .npy / .bin data)",
                    Some(_) => "the model's tokenizer has no end-of-text token to separate documents",
                };
                return Err(Error::Data {
                    path: path.clone(),
                    message: format!("text data needs a tokenizer, but {why}"),
                });
            }
            sources.push_back((path.clone(), format));
        }
        Ok(ChunkStream {
            spec: self.clone(),
            tokenizer: tokenizer.cloned(),
            pending: sources,
            current: None,
            buffer: Vec::new(),
            tokens_read: 0,
            text_bytes: 0,
            chunks_emitted: 0,
            fingerprints: VecDeque::new(),
            shuffle: None,
        })
    }
}

/// Sequences a shuffled stream holds to draw from by default (see [`ChunkStream::shuffled`]):
/// 8 MiB of token ids at 2048 tokens each, read ahead of the first draw.
pub const SHUFFLED_SEQUENCES: usize = 1024;

/// The pool a shuffled stream draws its chunks from.
struct Shuffle {
    seed: u64,
    size: usize,
    rng: rand::rngs::StdRng,
    /// Chunks in data order not yet drawn, each with its index in that order.
    pool: Vec<(u64, Vec<u32>)>,
    /// Chunks packed so far.
    packed: u64,
    /// The data-order indices of the latest chunks drawn, oldest first.
    drawn: VecDeque<u64>,
}

impl Shuffle {
    /// A chunk drawn at random from the pool, after topping it up from `pack`; `None` once
    /// both are empty.
    fn draw(
        &mut self,
        mut pack: impl FnMut() -> Result<Option<Vec<u32>>>,
    ) -> Result<Option<Vec<u32>>> {
        use rand::Rng;
        while self.pool.len() < self.size {
            let Some(chunk) = pack()? else { break };
            self.pool.push((self.packed, chunk));
            self.packed += 1;
        }
        if self.pool.is_empty() {
            return Ok(None);
        }
        let (index, chunk) = self
            .pool
            .swap_remove(self.rng.random_range(0..self.pool.len()));
        if self.drawn.len() == FINGERPRINTS_KEPT {
            self.drawn.pop_front();
        }
        self.drawn.push_back(index);
        Ok(Some(chunk))
    }
}

/// Where the next tokens come from.
enum Source {
    Documents {
        path: PathBuf,
        docs: Box<dyn Iterator<Item = Result<String>> + Send>,
    },
    Tokens {
        array: TokenArray,
        next: usize,
    },
}

/// Documents tokenized per refill; bounds memory and lets the tokenizer use threads.
const DOCUMENTS_PER_BATCH: usize = 256;

/// How many of the latest chunk boundaries [`ChunkStream::fingerprint_after`] can tell: more
/// than any trainer reads ahead of the rows it has used.
const FINGERPRINTS_KEPT: usize = 1 << 16;

/// FNV-1a's 64-bit offset basis and prime, over token ids.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of token ids, continued from `hash`: the fingerprint of data that chunk
/// streams and activation caches give training checkpoints.
pub(crate) fn fnv1a_ids(hash: u64, ids: impl IntoIterator<Item = u32>) -> u64 {
    ids.into_iter()
        .fold(hash, |h, id| (h ^ u64::from(id)).wrapping_mul(FNV_PRIME))
}

/// An iterator of `seq_len`-token chunks over a dataset.
pub struct ChunkStream {
    spec: DataSpec,
    tokenizer: Option<Tokenizer>,
    pending: VecDeque<(PathBuf, DataFormat)>,
    current: Option<Source>,
    buffer: Vec<u32>,
    tokens_read: u64,
    text_bytes: u64,
    chunks_emitted: u64,
    /// The fingerprint of the tokens of all chunks so far, after each of the latest chunks.
    fingerprints: VecDeque<u64>,
    shuffle: Option<Shuffle>,
}

impl ChunkStream {
    /// This stream with its chunks in a random order (tuned-lens and sparsify shuffle their
    /// training data): each chunk is drawn, with `seed`, from a pool of the next `sequences`
    /// chunks in data order, so that memory stays bounded. The same seed and pool size give
    /// the same order, which a resumed job replays. Fingerprints, skips and limits count
    /// chunks in the order they are returned.
    pub fn shuffled(mut self, seed: u64, sequences: usize) -> Self {
        use rand::SeedableRng;
        self.shuffle = Some(Shuffle {
            seed,
            size: sequences.max(1),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            pool: Vec::new(),
            packed: 0,
            drawn: VecDeque::new(),
        });
        self
    }

    /// How the chunks are shuffled, for the description of a training source: "shuffled
    /// with seed S among N sequences"; `None` in data order.
    pub fn shuffling(&self) -> Option<String> {
        let s = self.shuffle.as_ref()?;
        Some(format!(
            "shuffled with seed {} among {} sequences",
            s.seed, s.size
        ))
    }

    /// Tokens per chunk.
    pub fn seq_len(&self) -> usize {
        self.spec.seq_len
    }

    /// What the stream reads.
    pub fn spec(&self) -> &DataSpec {
        &self.spec
    }

    /// Bytes of text consumed so far (for bits-per-byte), counted as tuned-lens does: each
    /// document with the EOS token's text (`<|endoftext|>`, 13 bytes) before it; 0 for
    /// pre-tokenized data.
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    /// Tokens produced by tokenization or read from arrays so far.
    pub fn tokens_read(&self) -> u64 {
        self.tokens_read
    }

    /// Chunks returned so far.
    pub fn chunks_emitted(&self) -> u64 {
        self.chunks_emitted
    }

    /// `error` from a forward pass over the last `batch` chunks returned, with an
    /// out-of-range token id located in the data: its packed sequence (counted from 0 over
    /// the whole dataset) and position there, rather than its place in one forward batch.
    /// Other errors pass through.
    pub fn locate_token_error(&self, error: Error, batch: usize) -> Error {
        let Error::TokenOutOfRange {
            token,
            position,
            vocab_size,
        } = error
        else {
            return error;
        };
        let seq_len = self.spec.seq_len.max(1);
        let returned =
            self.chunks_emitted.saturating_sub(batch as u64) + (position / seq_len) as u64;
        // Shuffled, the chunk's place in the data is what locates it there.
        let sequence = match &self.shuffle {
            None => returned,
            Some(s) => {
                let back = self.chunks_emitted.saturating_sub(returned);
                s.drawn
                    .len()
                    .checked_sub(back as usize)
                    .and_then(|i| s.drawn.get(i).copied())
                    .unwrap_or(returned)
            }
        };
        let paths = &self.spec.paths;
        let data = match paths.as_slice() {
            [one] => one.display().to_string(),
            _ => format!(
                "the data ({} files, from {})",
                paths.len(),
                paths
                    .first()
                    .map_or(String::new(), |p| p.display().to_string())
            ),
        };
        Error::InvalidArgument(format!(
            "{data}: token id {token} at position {} of sequence {sequence} (the data packed \
             into {seq_len}-token sequences, counted from 0) is out of range for the model's \
             vocabulary of {vocab_size}: the tokenizer or token file was made for another model",
            position % seq_len
        ))
    }

    /// A fingerprint (64-bit FNV-1a) of the token ids of the first `chunks` chunks, which a
    /// resumed job compares with the one it saved, to refuse data that changed under it;
    /// `None` when the stream has not reached that chunk or has moved too far past it.
    pub fn fingerprint_after(&self, chunks: u64) -> Option<String> {
        let fingerprint = if chunks == 0 {
            FNV_OFFSET
        } else {
            let back = self.chunks_emitted.checked_sub(chunks)?;
            let kept = self.fingerprints.len() as u64;
            *self
                .fingerprints
                .get(kept.checked_sub(back + 1)? as usize)?
        };
        Some(format!(
            "{fingerprint:016x} (FNV-1a of the first {chunks} chunks of {} tokens)",
            self.spec.seq_len
        ))
    }

    /// [`ChunkStream::fingerprint_after`] every chunk returned so far.
    pub fn fingerprint(&self) -> Option<String> {
        self.fingerprint_after(self.chunks_emitted)
    }

    /// Skips `n` chunks (to resume a job where it stopped).
    pub fn skip_chunks(&mut self, n: u64) -> Result<u64> {
        let mut skipped = 0;
        while skipped < n {
            match self.next_chunk()? {
                Some(_) => skipped += 1,
                None => break,
            }
        }
        Ok(skipped)
    }

    /// Up to `n` chunks; fewer only at the end of the data.
    pub fn next_chunks(&mut self, n: usize) -> Result<Vec<Vec<u32>>> {
        let mut chunks = Vec::with_capacity(n.min(1024));
        while chunks.len() < n {
            match self.next_chunk()? {
                Some(chunk) => chunks.push(chunk),
                None => break,
            }
        }
        Ok(chunks)
    }

    /// The next chunk, or `None` when the data is exhausted (a final partial chunk is dropped).
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u32>>> {
        let next = match self.shuffle.take() {
            None => self.next_packed(),
            Some(mut shuffle) => {
                let drawn = shuffle.draw(|| self.next_packed());
                self.shuffle = Some(shuffle);
                drawn
            }
        };
        let Some(chunk) = next? else {
            return Ok(None);
        };
        let before = self.fingerprints.back().copied().unwrap_or(FNV_OFFSET);
        let after = fnv1a_ids(before, chunk.iter().copied());
        if self.fingerprints.len() == FINGERPRINTS_KEPT {
            self.fingerprints.pop_front();
        }
        self.fingerprints.push_back(after);
        self.chunks_emitted += 1;
        Ok(Some(chunk))
    }

    /// The next chunk in data order.
    fn next_packed(&mut self) -> Result<Option<Vec<u32>>> {
        let seq_len = self.spec.seq_len;
        while self.buffer.len() < seq_len {
            if !self.refill()? {
                return Ok(None);
            }
        }
        let rest = self.buffer.split_off(seq_len);
        Ok(Some(std::mem::replace(&mut self.buffer, rest)))
    }

    /// Adds tokens to the buffer; false when every source is exhausted.
    fn refill(&mut self) -> Result<bool> {
        loop {
            if self.current.is_none() {
                let Some((path, format)) = self.pending.pop_front() else {
                    return Ok(false);
                };
                self.current = Some(self.open(path, format)?);
            }
            let added = match self.current.as_mut() {
                Some(Source::Documents { path, docs }) => {
                    let mut batch = Vec::new();
                    for doc in docs.by_ref().take(DOCUMENTS_PER_BATCH) {
                        batch.push(doc?);
                    }
                    if batch.is_empty() {
                        0
                    } else {
                        let path = path.clone();
                        self.tokenize(&path, batch)?
                    }
                }
                Some(Source::Tokens { array, next }) => {
                    let want = (self.spec.seq_len * 64).max(1 << 16);
                    let mut tokens = array.read(*next, want)?;
                    *next += tokens.len();
                    let n = tokens.len();
                    self.buffer.append(&mut tokens);
                    n
                }
                None => 0,
            };
            if added > 0 {
                self.tokens_read += added as u64;
                return Ok(true);
            }
            self.current = None;
        }
    }

    fn tokenize(&mut self, path: &Path, docs: Vec<String>) -> Result<usize> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .expect("checked when the stream was opened");
        let eos = tokenizer
            .eos_id()
            .expect("checked when the stream was opened");
        // As tuned-lens counts them: the text joined with the EOS token's text before each
        // document.
        let separator = tokenizer
            .inner()
            .id_to_token(eos)
            .map_or(0, |t| t.len() as u64);
        self.text_bytes += docs.iter().map(|d| d.len() as u64 + separator).sum::<u64>();
        let encodings = tokenizer
            .inner()
            .encode_batch(docs, false)
            .map_err(|e| Error::Data {
                path: path.into(),
                message: format!("tokenization failed: {e}"),
            })?;
        let before = self.buffer.len();
        for encoding in encodings {
            self.buffer.push(eos);
            self.buffer.extend_from_slice(encoding.get_ids());
        }
        Ok(self.buffer.len() - before)
    }

    fn open(&self, path: PathBuf, format: DataFormat) -> Result<Source> {
        let field = self.spec.text_field.clone();
        Ok(match format {
            DataFormat::TextLines => Source::Documents {
                docs: Box::new(text_lines(&path)?),
                path,
            },
            DataFormat::TextFile => {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                // Universal newlines, as Python reads text (lines() already drops "\r\n").
                let text = text.replace("\r\n", "\n").replace('\r', "\n");
                Source::Documents {
                    docs: Box::new(std::iter::once(Ok(text))),
                    path,
                }
            }
            DataFormat::Jsonl => Source::Documents {
                docs: Box::new(jsonl_texts(&path, field)?),
                path,
            },
            DataFormat::Parquet => Source::Documents {
                docs: Box::new(parquet_texts(&path, field)?),
                path,
            },
            DataFormat::Npy => {
                let array = TokenArray::open_npy(&path)?;
                if let Some(row_len) = array.row_len.filter(|&r| r != self.spec.seq_len) {
                    tracing::info!(
                        "{}: its rows of {row_len} tokens are read as one stream and cut into \
                         sequences of {}",
                        path.display(),
                        self.spec.seq_len
                    );
                }
                Source::Tokens { array, next: 0 }
            }
            DataFormat::Bin => Source::Tokens {
                array: TokenArray::open_bin(&path)?,
                next: 0,
            },
        })
    }
}

impl Iterator for ChunkStream {
    type Item = Result<Vec<u32>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

fn open_lines(path: &Path) -> Result<impl Iterator<Item = (usize, Result<String>)>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let path = path.to_path_buf();
    Ok(BufReader::new(file)
        .lines()
        .enumerate()
        .map(move |(i, line)| {
            let line = line.map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => Error::Data {
                    path: path.clone(),
                    message: format!("line {}: not valid UTF-8 text", i + 1),
                },
                _ => Error::io(&path, e),
            });
            (i + 1, line)
        }))
}

fn text_lines(path: &Path) -> Result<impl Iterator<Item = Result<String>>> {
    Ok(open_lines(path)?.filter_map(|(_, line)| match line {
        Ok(line) if line.trim().is_empty() => None,
        other => Some(other),
    }))
}

fn jsonl_texts(path: &Path, field: String) -> Result<impl Iterator<Item = Result<String>>> {
    let path = path.to_path_buf();
    Ok(open_lines(&path)?.filter_map(move |(number, line)| {
        let line = match line {
            Ok(line) if line.trim().is_empty() => return None,
            // A byte-order mark some editors put first is not JSON.
            Ok(line) if number == 1 => line.trim_start_matches('\u{feff}').to_string(),
            Ok(line) => line,
            Err(e) => return Some(Err(e)),
        };
        let bad = |message: String| Error::Data {
            path: path.clone(),
            message: format!("line {number}: {message}"),
        };
        let value: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => return Some(Err(bad(format!("not valid JSON: {e}")))),
        };
        Some(match value.get(&field) {
            Some(serde_json::Value::String(text)) => Ok(text.clone()),
            Some(other) => Err(bad(format!("field '{field}' is not a string: {other}"))),
            None => Err(bad(format!(
                "no field '{field}' (use --text-field to pick another)"
            ))),
        })
    }))
}

fn parquet_texts(path: &Path, field: String) -> Result<impl Iterator<Item = Result<String>>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let bad = |message: String| Error::Data {
        path: path.into(),
        message,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // The parquet crate panics on some damaged files (out-of-range indices in their encoded
    // pages): those panics become errors here and where rows are read below.
    let reader = crate::error::without_panicking(|| SerializedFileReader::new(file))
        .map_err(|panic| bad(format!("not a readable parquet file: damaged ({panic})")))?
        .map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let columns: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
    if !columns.contains(&field) {
        return Err(bad(format!(
            "no column '{field}' (columns: {})",
            columns.join(", ")
        )));
    }
    let path = path.to_path_buf();
    let mut rows = reader.into_iter();
    let mut damaged = false;
    let rows = std::iter::from_fn(move || {
        if damaged {
            return None;
        }
        crate::error::without_panicking(|| rows.next()).unwrap_or_else(|panic| {
            damaged = true;
            Some(Err(parquet::errors::ParquetError::General(format!(
                "the file is damaged ({panic})"
            ))))
        })
    });
    Ok(rows.enumerate().map(move |(row_number, row)| {
        let bad = |message: String| Error::Data {
            path: path.clone(),
            message: format!("row {row_number}: {message}"),
        };
        let row = row.map_err(|e| bad(e.to_string()))?;
        let value = row
            .get_column_iter()
            .find(|(name, _)| **name == field)
            .map(|(_, value)| value.clone());
        match value {
            Some(Field::Str(text)) => Ok(text),
            Some(Field::Null) => Ok(String::new()),
            other => Err(bad(format!("column '{field}' is not a string: {other:?}"))),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt-neox-20b-tokenizer.json");
        Tokenizer::from_file(&path, Some(0)).unwrap()
    }

    fn wikitext() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/wikitext-2-raw-test.txt")
    }

    fn collect(spec: &DataSpec, tok: &Tokenizer) -> Vec<Vec<u32>> {
        spec.chunks(Some(tok))
            .unwrap()
            .collect::<Result<Vec<_>>>()
            .unwrap()
    }

    #[test]
    fn documents_are_eos_joined_and_packed() {
        let tok = tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.txt");
        std::fs::write(
            &path,
            "Hello world\n\n  \nThe cat sat on the mat.\nA third line here\n",
        )
        .unwrap();
        let mut stream: Vec<u32> = Vec::new();
        for doc in [
            "Hello world",
            "The cat sat on the mat.",
            "A third line here",
        ] {
            stream.push(0);
            stream.extend(tok.encode(doc).unwrap());
        }
        let mut read = DataSpec::new(vec![path.clone()], 4)
            .chunks(Some(&tok))
            .unwrap();
        let chunks: Vec<Vec<u32>> = read.by_ref().collect::<Result<_>>().unwrap();
        // Bits per byte as tuned-lens counts: every token read over the text joined with
        // "<|endoftext|>" before each document.
        assert_eq!(read.tokens_read(), stream.len() as u64);
        let text =
            "Hello world".len() + "The cat sat on the mat.".len() + "A third line here".len();
        assert_eq!(read.text_bytes(), (text + 3 * "<|endoftext|>".len()) as u64);
        assert_eq!(chunks.len(), stream.len() / 4);
        assert_eq!(chunks.concat(), stream[..chunks.len() * 4]);
        assert_eq!(chunks[0][0], 0, "first token is EOS");

        let mut spec = DataSpec::new(vec![path], 4);
        spec.format = Some("text-file".into());
        let whole = collect(&spec, &tok);
        assert_eq!(whole.concat()[0], 0);
        assert_eq!(
            whole.concat()[1..],
            tok.encode("Hello world\n\n  \nThe cat sat on the mat.\nA third line here\n")
                .unwrap()[..whole.len() * 4 - 1]
        );
    }

    #[test]
    fn a_shuffled_stream_returns_the_same_chunks_in_a_seeded_order() {
        let tok = tokenizer();
        let spec = DataSpec::new(vec![wikitext()], 16);
        let in_order: Vec<Vec<u32>> = spec
            .chunks(Some(&tok))
            .unwrap()
            .take(300)
            .map(Result::unwrap)
            .collect();
        let shuffled = |seed: u64, pool: usize| -> Vec<Vec<u32>> {
            let stream = spec.chunks(Some(&tok)).unwrap().shuffled(seed, pool);
            assert_eq!(
                stream.shuffling().unwrap(),
                format!("shuffled with seed {seed} among {pool} sequences")
            );
            stream.take(300).map(Result::unwrap).collect()
        };
        let a = shuffled(42, 64);
        assert_ne!(a, in_order);
        assert_eq!(a, shuffled(42, 64), "the seed decides the order");
        assert_ne!(a, shuffled(43, 64));
        // Drawn from a bounded pool: chunk i is among the first i + 64 in data order.
        for (i, chunk) in a.iter().enumerate() {
            let at = in_order.iter().position(|c| c == chunk);
            assert!(
                at.is_none_or(|at| at < i + 64),
                "chunk {i} came from {at:?}"
            );
        }
        // All of a small dataset, each chunk once.
        let few = DataSpec::new(vec![wikitext()], 4096);
        let mut all: Vec<Vec<u32>> = few
            .chunks(Some(&tok))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut drawn: Vec<Vec<u32>> = few
            .chunks(Some(&tok))
            .unwrap()
            .shuffled(1, 1 << 20)
            .map(Result::unwrap)
            .collect();
        assert_ne!(drawn, all);
        all.sort();
        drawn.sort();
        assert_eq!(drawn, all);
        assert_eq!(spec.chunks(Some(&tok)).unwrap().shuffling(), None);
    }

    #[test]
    fn fingerprints_tell_the_data_apart_at_any_recent_chunk() {
        let tok = tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
        std::fs::write(
            &a,
            "The cat sat on the mat.\nA dog ran in the park today.\n",
        )
        .unwrap();
        std::fs::write(
            &b,
            "The cat sat on the mat.\nA dog ran in the yard today.\n",
        )
        .unwrap();
        let stream = |path: &Path, chunks: u64| {
            let mut stream = DataSpec::new(vec![path.into()], 4)
                .chunks(Some(&tok))
                .unwrap();
            stream.skip_chunks(chunks).unwrap();
            stream
        };
        let (first, second) = (stream(&a, 4), stream(&b, 4));
        // Equal over the shared beginning, different once the texts differ; the same value
        // whether asked right after a chunk or later on.
        assert_eq!(first.fingerprint_after(0), second.fingerprint_after(0));
        assert_eq!(first.fingerprint_after(1), second.fingerprint_after(1));
        assert_ne!(first.fingerprint_after(4), second.fingerprint_after(4));
        assert_eq!(
            first.fingerprint_after(2),
            stream(&a, 2).fingerprint_after(2)
        );
        assert_eq!(first.fingerprint_after(5), None, "not reached yet");
    }

    /// Windows line ends read as Unix ones (Python's universal newlines, as the reference
    /// tools read text): the same tokens, one document per line or per file.
    #[test]
    fn crlf_text_reads_as_lf() {
        let tok = tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let text = "Hello world\nThe cat sat on the mat.\nA third line here\n".repeat(3);
        let (lf, crlf) = (dir.path().join("lf.txt"), dir.path().join("crlf.txt"));
        std::fs::write(&lf, &text).unwrap();
        std::fs::write(&crlf, text.replace('\n', "\r\n")).unwrap();
        for format in [None, Some("text-file")] {
            let chunks = |path: &Path| {
                let mut spec = DataSpec::new(vec![path.to_path_buf()], 4);
                spec.format = format.map(String::from);
                collect(&spec, &tok)
            };
            assert_eq!(chunks(&crlf), chunks(&lf), "{format:?}");
        }
    }

    #[test]
    fn jsonl_with_field_and_errors() {
        let tok = tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"body\": \"one two three four five\"}\n\n{\"body\": \"six seven\"}\n",
        )
        .unwrap();
        let mut spec = DataSpec::new(vec![path.clone()], 3);
        spec.text_field = "body".into();
        let chunks = collect(&spec, &tok);
        let mut expected = vec![0];
        expected.extend(tok.encode("one two three four five").unwrap());
        expected.push(0);
        expected.extend(tok.encode("six seven").unwrap());
        assert_eq!(chunks.concat(), expected[..chunks.len() * 3]);

        spec.text_field = "text".into();
        // The error of the first chunk of `contents`.
        let first_error = |contents: &[u8]| {
            std::fs::write(&path, contents).unwrap();
            let first = spec.chunks(Some(&tok)).unwrap().next().unwrap();
            first.unwrap_err().to_string()
        };
        let err = first_error(b"{\"body\": \"one\"}\n");
        assert!(err.contains("line 1: no field 'text'"), "{err}");
        let err = first_error(b"{\"text\": 3}\n");
        assert!(
            err.contains("d.jsonl") && err.contains("not a string"),
            "{err}"
        );
        let err = first_error(b"{oops\n");
        assert!(err.contains("not valid JSON"), "{err}");
        // A byte-order mark before the first line is not an error; bytes that are not UTF-8
        // are named by line.
        std::fs::write(&path, "\u{feff}{\"text\": \"six seven\"}\n").unwrap();
        let first = spec.chunks(Some(&tok)).unwrap().next().unwrap().unwrap();
        assert_eq!(first[1..], tok.encode("six seven").unwrap()[..2]);
        let err = first_error(b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n");
        assert!(
            err.contains("d.jsonl: line 2: not valid UTF-8 text"),
            "{err}"
        );
    }

    #[test]
    fn parquet_text_column() {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;

        let tok = tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.parquet");
        let schema = Arc::new(
            parse_message_type("message doc { REQUIRED BYTE_ARRAY text (UTF8); }").unwrap(),
        );
        let file = File::create(&path).unwrap();
        let mut writer =
            SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
                .unwrap();
        let docs = ["Parquet rows are documents.", "Second row of text."];
        let mut group = writer.next_row_group().unwrap();
        let mut column = group.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = docs.iter().map(|d| ByteArray::from(*d)).collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        column.close().unwrap();
        group.close().unwrap();
        writer.close().unwrap();

        let chunks = collect(&DataSpec::new(vec![path.clone()], 2), &tok);
        let mut expected = Vec::new();
        for doc in docs {
            expected.push(0);
            expected.extend(tok.encode(doc).unwrap());
        }
        assert_eq!(chunks.concat(), expected[..chunks.len() * 2]);

        let mut spec = DataSpec::new(vec![path], 2);
        spec.text_field = "content".into();
        let err = spec
            .chunks(Some(&tok))
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("no column 'content' (columns: text)"), "{err}");
    }

    #[test]
    fn pretokenized_and_empty_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let tokens: Vec<u8> = (0u16..10).flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, tokens).unwrap();
        let mut stream = DataSpec::new(vec![path.clone()], 4).chunks(None).unwrap();
        assert_eq!(
            stream.next_chunks(5).unwrap(),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        // A batch size far past the data (a flag typed with extra digits) takes what there
        // is, without sizing anything by it.
        let mut stream = DataSpec::new(vec![path], 4).chunks(None).unwrap();
        assert_eq!(stream.next_chunks(usize::MAX).unwrap().len(), 2);

        let empty = dir.path().join("e.txt");
        std::fs::write(&empty, "\n\n").unwrap();
        let tok = tokenizer();
        assert!(DataSpec::new(vec![empty], 4)
            .chunks(Some(&tok))
            .unwrap()
            .next()
            .is_none());
        let err = DataSpec::new(vec![dir.path().join("missing.txt")], 4)
            .chunks(Some(&tok))
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing.txt: file not found"));
        let err = DataSpec::new(vec![dir.path().to_path_buf()], 4)
            .chunks(Some(&tok))
            .err()
            .unwrap();
        assert!(
            err.to_string().ends_with(": is a folder, not a file"),
            "{err}"
        );
        // A name that is not UTF-8 cannot be recorded in a cache's or checkpoint's settings.
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let odd = dir
                .path()
                .join(std::ffi::OsStr::from_bytes(b"bad-\xff.txt"));
            std::fs::write(&odd, "some text\n").unwrap();
            let err = DataSpec::new(vec![odd], 4)
                .chunks(Some(&tok))
                .err()
                .unwrap();
            assert!(
                err.to_string().contains("its name is not valid UTF-8"),
                "{err}"
            );
        }
    }
}
