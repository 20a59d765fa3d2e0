//! Chat templates: the Jinja source a model file declares (`tokenizer.chat_template`),
//! rendered as transformers' `apply_chat_template` renders it, so that a local model gets
//! its prompts in the form it was tuned on, whatever its family (ChatML, Llama 3's headers,
//! `[INST]` turns, ...).
//!
//! transformers runs the template in a Jinja2 sandbox with `trim_blocks` and `lstrip_blocks`,
//! loop controls (`break`, `continue`), `raise_exception(message)`, `strftime_now(format)`,
//! a `tojson` that is Python's `json.dumps` (non-ASCII kept, `", "` and `": "` separators,
//! `indent`, `sort_keys`), and `{% generation %}` blocks (which mark the assistant's part and
//! render their body); the template sees `messages`, `add_generation_prompt`, `tools` and
//! `documents` (None) and the special tokens (`bos_token`, `eos_token`, ...). This is that
//! environment on minijinja, with Python's string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`, ...) from minijinja-contrib and Python's printing of
//! booleans and None in `{{ }}`. Not the same: booleans and None joined with `~` or turned
//! into text with `|string` (`true`, `none`), lists and dicts printed directly
//! (`{{ [1, 'a'] }}`) as minijinja writes them, and a `{% generation %}` tag inside
//! `{% raw %}` or a string literal, which is rewritten anyway. Checked against transformers
//! on SmolLM2's template and four written in the shapes of other families
//! (`tests/fixtures/delphi/chat_templates.json`).
//!
//! Also here: the tokens that end a turn ([`turn_end_ids`]), where generation in a chat stops.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::{Error, Result, Tokenizer};

/// The name the template is compiled under (shown in render errors with a line number).
const NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: BTreeMap<String, String>,
}

impl ChatTemplate {
    /// Compiles `source`; `special_tokens` maps the variables `bos_token`, `eos_token`, ... to
    /// their text. A syntax error is reported with its line.
    pub fn new(
        source: &str,
        special_tokens: BTreeMap<String, String>,
    ) -> std::result::Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| {
            Err::<Value, _>(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // Python prints True, False and None where minijinja prints true, false and none.
        env.set_formatter(|out, state, value| {
            let python = match value.kind() {
                ValueKind::Bool if value.is_true() => "True",
                ValueKind::Bool => "False",
                ValueKind::None => "None",
                _ => return minijinja::escape_formatter(out, state, value),
            };
            out.write_str(python)
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write"))
        });
        env.add_template_owned(NAME, generation_blocks_as_ifs(source))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// The template a GGUF file's metadata declares (`tokenizer.chat_template`), with its
    /// special tokens ([`special_tokens`]); the error says what is missing or wrong.
    pub fn from_gguf(
        metadata: &HashMap<String, gguf_file::Value>,
    ) -> std::result::Result<Self, String> {
        let source = match metadata.get("tokenizer.chat_template") {
            Some(gguf_file::Value::String(source)) => source,
            Some(other) => {
                return Err(format!(
                    "GGUF metadata 'tokenizer.chat_template' must be a string, got {other:?}"
                ))
            }
            None => return Err("GGUF metadata 'tokenizer.chat_template' is missing".into()),
        };
        Self::new(source, special_tokens(metadata))
            .map_err(|message| format!("tokenizer.chat_template: {message}"))
    }

    /// The prompt text of `messages` (each serialised as `{"role": ..., "content": ...}`);
    /// with `add_generation_prompt`, it ends with the opening of the assistant's turn (when
    /// the template has one). A template that refuses the conversation (`raise_exception`)
    /// or fails gives its message.
    pub fn render<M: serde::Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        self.render_with(messages, add_generation_prompt, &BTreeMap::new())
    }

    /// [`ChatTemplate::render`] with more variables for the template (transformers passes
    /// `apply_chat_template`'s extra keyword arguments so: `enable_thinking`, `tools`, ...);
    /// they override the defaults of the same name.
    pub fn render_with<M: serde::Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        variables: &BTreeMap<String, serde_json::Value>,
    ) -> std::result::Result<String, String> {
        let mut context: BTreeMap<&str, Value> = self
            .special_tokens
            .iter()
            .map(|(name, text)| (name.as_str(), Value::from(text.as_str())))
            .collect();
        context.insert("messages", Value::from(Serde(messages)));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // transformers passes these as None when there are none.
        context.insert("tools", Value::from(()));
        context.insert("documents", Value::from(()));
        for (name, value) in variables {
            context.insert(name, Value::from(Serde(value)));
        }
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        template.render(Serde(context)).map_err(|e| e.to_string())
    }
}

/// What a model needs to hold a conversation: its tokenizer, its chat template and the tokens
/// that end a turn ([`turn_end_ids`]), read from its files without its weights or config (so
/// any architecture will do).
#[derive(Debug)]
pub struct ModelChat {
    /// The tokenizer of the model's files (a model given another one tokenizes with that).
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub template: ChatTemplate,
    /// The tokens where an answer ends, sorted.
    pub turn_end_ids: Vec<u32>,
}

impl ModelChat {
    /// The chat of a model named as [`crate::Model::load`] takes it, at `revision`
    /// ([`ModelChat::of`]).
    pub fn for_model(name: &str, revision: Option<&str>) -> Result<Self> {
        Self::of(&crate::source::ModelSpec::parse(name, revision)?)
    }

    /// The chat of the model `spec` names: a GGUF file's metadata, or a folder's or hub
    /// repository's `tokenizer.json` and template. The template is `chat_template.jinja` when
    /// there is one (transformers prefers it), else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates: the `default` one); its
    /// special tokens are the config's `bos_token`, `eos_token`, `unk_token` and `pad_token`,
    /// or `special_tokens_map.json`'s. On the hub, only the files the repository has are read
    /// (offline, those its cached snapshot holds).
    pub fn of(spec: &crate::source::ModelSpec) -> Result<Self> {
        use crate::source::ModelSpec;
        let name = spec.origin();
        let file_names = [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ];
        let files: Vec<Option<PathBuf>> = match spec {
            ModelSpec::Gguf(path) => {
                let (content, _) = crate::gguf_header(path)?;
                let tokenizer = crate::gguf_tokenizer(&content, path)?.ok_or_else(|| {
                    config_error(
                    path,
                    "has no tokenizer this crate can rebuild (needs tokenizer.ggml.model = gpt2)",
                )
                })?;
                let template = ChatTemplate::from_gguf(&content.metadata)
                    .map_err(|message| config_error(path, message))?;
                return Ok(Self {
                    turn_end_ids: turn_end_ids(Some(&content.metadata), &tokenizer),
                    tokenizer,
                    template,
                });
            }
            ModelSpec::Folder(dir) => file_names
                .iter()
                .map(|name| Some(dir.join(name)).filter(|path| path.is_file()))
                .collect(),
            // Offline, or when the cached snapshot has the tokenizer and a template (the model
            // was loaded from it): what the snapshot holds. Online: the files the repository
            // has (only a file it lacks is absent; any other failure is an error).
            ModelSpec::Hub { repo_id, revision }
                if crate::source::hub_offline() || cached_chat(repo_id, revision).is_some() =>
            {
                let kind = crate::source::RepoType::Model;
                let snapshot =
                    crate::source::cached_snapshot(kind, repo_id, revision).ok_or_else(|| {
                        crate::source::not_cached(
                            kind,
                            repo_id,
                            revision,
                            "HF_HUB_OFFLINE is set and nothing of it is cached".into(),
                        )
                    })?;
                file_names
                    .iter()
                    .map(|name| Some(snapshot.join(name)).filter(|path| path.is_file()))
                    .collect()
            }
            ModelSpec::Hub { repo_id, revision } => file_names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    match crate::source::hub_repo_files(repo_id, revision, &[name.to_string()]) {
                        Ok(mut paths) => Ok(Some(paths.remove(0))),
                        // Only tokenizer.json (the first) must be there.
                        Err(Error::NotOnHub { .. }) if i > 0 => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .collect::<Result<_>>()?,
        };
        let [tokenizer, config, jinja, special_map] = [0, 1, 2, 3].map(|i| files[i].as_deref());
        let tokenizer = tokenizer.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{name}: has no tokenizer.json (needed to read prompts)"
            ))
        })?;
        let tokenizer = Tokenizer::from_file(tokenizer, None)?;
        let read_json = |path: &Path| -> Result<serde_json::Value> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| config_error(path, format!("cannot read: {e}")))?;
            serde_json::from_str(&text)
                .map_err(|e| config_error(path, format!("not valid JSON: {e}")))
        };
        let config_json = config.map(read_json).transpose()?;
        let source = match (jinja, config_json.as_ref().map(|c| &c["chat_template"])) {
            (Some(jinja), _) => std::fs::read_to_string(jinja)
                .map_err(|e| config_error(jinja, format!("cannot read: {e}")))?,
            (None, Some(serde_json::Value::String(source))) => source.clone(),
            // Older files list named templates; the one named "default" is the chat's.
            (None, Some(serde_json::Value::Array(named))) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    config_error(
                        config.expect("read above"),
                        "chat_template lists no template named 'default'",
                    )
                })?,
            _ => {
                return Err(Error::InvalidArgument(format!(
                "{name}: has no chat template (neither chat_template.jinja nor a chat_template \
                 in tokenizer_config.json)"
            )))
            }
        };
        // A special token is its text, or an object with its text as `content`.
        let special_map_json = special_map.map(read_json).transpose()?;
        let special_tokens: BTreeMap<String, String> =
            ["bos_token", "eos_token", "unk_token", "pad_token"]
                .into_iter()
                .filter_map(|name| {
                    let text = [&config_json, &special_map_json]
                        .into_iter()
                        .flatten()
                        .find_map(|json| {
                            let value = &json[name];
                            value.as_str().or_else(|| value["content"].as_str())
                        })?;
                    Some((name.to_string(), text.to_string()))
                })
                .collect();
        // The template's own end-of-sequence token ends a turn too.
        let mut ends = turn_end_ids(None, &tokenizer);
        let eos: Option<&String> = special_tokens.get("eos_token");
        ends.extend(eos.and_then(|text| tokenizer.inner().token_to_id(text)));
        ends.sort_unstable();
        ends.dedup();
        let template = ChatTemplate::new(&source, special_tokens).map_err(|message| {
            Error::InvalidArgument(format!("{name}: chat template: {message}"))
        })?;
        Ok(Self {
            turn_end_ids: ends,
            tokenizer,
            template,
        })
    }
}

/// The cached snapshot of a hub model, when it holds `tokenizer.json` and a chat template.
fn cached_chat(repo_id: &str, revision: &str) -> Option<PathBuf> {
    let kind = crate::source::RepoType::Model;
    crate::source::cached_snapshot(kind, repo_id, revision).filter(|snapshot| {
        snapshot.join("tokenizer.json").is_file()
            && ["tokenizer_config.json", "chat_template.jinja"]
                .iter()
                .any(|name| snapshot.join(name).is_file())
    })
}

/// An error in a file of a model's tokenizer or template, naming it.
fn config_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.into(),
        message: message.into(),
    }
}

/// Token texts that close a turn in common chat formats (ChatML, Llama 3, Phi 3, Gemma, and the
/// end-of-text tokens of GPT-2 and Llama 3 vocabularies): those in a model's vocabulary end its
/// answers, as llama.cpp does, besides the tokens the model's files name.
pub const END_OF_TURN: [&str; 7] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
];

/// The tokens that end a turn, where generating an answer stops: a GGUF file's EOS,
/// end-of-turn and end-of-message tokens (`tokenizer.ggml.eos_token_id`, `eot_token_id`,
/// `eom_token_id`) when `gguf_metadata` is given, the tokenizer's EOS, and the [`END_OF_TURN`]
/// tokens among the vocabulary's added (control) tokens, never a plain text token spelled the
/// same. Sorted, without repeats.
pub fn turn_end_ids(
    gguf_metadata: Option<&HashMap<String, gguf_file::Value>>,
    tokenizer: &Tokenizer,
) -> Vec<u32> {
    let added = tokenizer.inner().get_added_tokens_decoder();
    let mut ids: Vec<u32> = ["eos", "eot", "eom"]
        .iter()
        .filter_map(|name| {
            let value = gguf_metadata?.get(&format!("tokenizer.ggml.{name}_token_id"))?;
            value.to_u32().ok()
        })
        .chain(tokenizer.eos_id())
        .chain(
            added
                .iter()
                .filter(|(_, token)| END_OF_TURN.contains(&token.content.as_str()))
                .map(|(&id, _)| id),
        )
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The special tokens' texts under the names chat templates use (`bos_token`, `eos_token`,
/// `unk_token`, `pad_token`), for those a GGUF file names.
pub fn special_tokens(metadata: &HashMap<String, gguf_file::Value>) -> BTreeMap<String, String> {
    let Some(gguf_file::Value::Array(tokens)) = metadata.get("tokenizer.ggml.tokens") else {
        return BTreeMap::new();
    };
    [
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ]
    .into_iter()
    .filter_map(|(variable, name)| {
        let id = metadata
            .get(&format!("tokenizer.ggml.{name}_token_id"))?
            .to_u32()
            .ok()?;
        let text = tokens.get(usize::try_from(id).ok()?)?.to_string().ok()?;
        Some((variable.to_string(), text.clone()))
    })
    .collect()
}

/// `source` with transformers' `{% generation %}` / `{% endgeneration %}` tags (which only
/// render their body) turned into `{% if true %}` / `{% endif %}`, whitespace controls kept.
fn generation_blocks_as_ifs(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        let Some(close) = tag[2..].find("%}").map(|i| i + 2) else {
            break;
        };
        let inner = &tag[2..close];
        let (left, inner) = match inner.strip_prefix(['-', '+']) {
            Some(rest) => (&inner[..1], rest),
            None => ("", inner),
        };
        let (body, right) = match inner.strip_suffix(['-', '+']) {
            Some(body) => (body, &inner[body.len()..]),
            None => (inner, ""),
        };
        match body.trim() {
            "generation" => write!(out, "{{%{left} if true {right}%}}").expect("a String"),
            "endgeneration" => write!(out, "{{%{left} endif {right}%}}").expect("a String"),
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// `strftime_now(format)`: the local time, formatted with strftime's codes.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let invalid = || {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    };
    let items = chrono::format::StrftimeItems::new(&format)
        .parse()
        .map_err(|_| invalid())?;
    let mut out = String::new();
    write!(
        out,
        "{}",
        chrono::Local::now().format_with_items(items.iter())
    )
    .map_err(|_| invalid())?;
    Ok(out)
}

/// `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with those keyword arguments.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(text) => text.to_string(),
            None => match v.as_i64() {
                Some(width @ 0..=MAX_INDENT) => " ".repeat(width as usize),
                // Python indents by `" " * indent`: nothing for a negative width.
                Some(width) if width < 0 => String::new(),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent must be a width from 0 to {MAX_INDENT}, got {v}"),
                    ))
                }
            },
        }),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: separators must be two strings, got {other:?}"),
            ))
        }
        // Python drops the space after the comma when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = JsonStyle {
        indent,
        item,
        key,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    style.write(&mut out, &value, 0)?;
    Ok(out)
}

/// The widest `tojson` indent accepted (a huge one would exhaust memory).
const MAX_INDENT: i64 = 64;

/// How Python's `json.dumps` lays out a value.
struct JsonStyle {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn write(
        &self,
        out: &mut String,
        value: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
            ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone())?)),
            ValueKind::String => self.string(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(out, '[', ']', depth, &items, |out, item| {
                    self.write(out, item, depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries = value
                    .try_iter()?
                    .map(|key| {
                        let item = value.get_item(&key)?;
                        let name = match key.as_str() {
                            Some(text) => text.to_string(),
                            None => key.to_string(),
                        };
                        Ok((name, item))
                    })
                    .collect::<std::result::Result<Vec<(String, Value)>, minijinja::Error>>()?;
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(out, '{', '}', depth, &entries, |out, (name, item)| {
                    self.string(out, name);
                    out.push_str(&self.key);
                    self.write(out, item, depth + 1)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of kind {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// `open items close`, one item a line when indenting.
    fn container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        depth: usize,
        items: &[T],
        mut write_item: impl FnMut(&mut String, &T) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, depth: usize| {
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth));
            }
        };
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item);
            }
            newline(out, depth + 1);
            write_item(out, item)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    /// A JSON string literal as Python writes it.
    fn string(&self, out: &mut String, text: &str) {
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        write!(out, "\\u{unit:04x}").expect("a String");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read back, positional
/// for decimal exponents -4 to 15 (with at least one decimal), scientific otherwise
/// (`1e+16`, `1e-05`).
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e}'s exponent is an integer");
    if (-4..16).contains(&exponent) {
        let text = format!("{x}");
        if text.contains('.') {
            text
        } else {
            format!("{text}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/delphi/chat_templates.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON")
    }

    fn messages(conversation: &serde_json::Value) -> Vec<serde_json::Value> {
        serde_json::from_value(conversation["messages"].clone()).expect("messages")
    }

    fn message(role: &str, content: &str) -> serde_json::Value {
        serde_json::json!({"role": role, "content": content})
    }

    /// No messages (templates that print something else).
    const NONE: &[serde_json::Value] = &[];

    #[test]
    fn renders_like_transformers() {
        let fixture = fixture();
        let conversations: BTreeMap<String, Vec<serde_json::Value>> = fixture["conversations"]
            .as_array()
            .expect("conversations")
            .iter()
            .map(|c| (c["name"].as_str().expect("name").to_string(), messages(c)))
            .collect();
        let mut checked = 0;
        for template in fixture["templates"].as_array().expect("templates") {
            let name = template["name"].as_str().expect("name");
            let special_tokens =
                serde_json::from_value(template["special_tokens"].clone()).expect("special tokens");
            let compiled =
                ChatTemplate::new(template["source"].as_str().expect("source"), special_tokens)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            for render in template["renders"].as_array().expect("renders") {
                let conversation = render["conversation"].as_str().expect("conversation");
                let generation = render["add_generation_prompt"].as_bool().expect("flag");
                let ours = compiled.render(&conversations[conversation], generation);
                let case = format!("{name} / {conversation} / add_generation_prompt {generation}");
                match (&ours, render["text"].as_str(), render["error"].as_str()) {
                    (Ok(text), Some(expected), _) => assert_eq!(text, expected, "{case}"),
                    (Err(error), None, Some(expected)) => {
                        assert!(error.contains(expected), "{case}: {error}")
                    }
                    _ => panic!("{case}: ours {ours:?}, transformers {render}"),
                }
                checked += 1;
            }
        }
        // 5 templates x 5 conversations x with and without the generation prompt.
        assert_eq!(checked, 50);
    }

    /// A model loaded from a folder reads its chat format from the same folder (at the
    /// revision loaded); a folder without a template is an error naming what is missing; a
    /// tokenizer given in place of the folder's brings its own end tokens.
    #[test]
    fn a_folder_models_chat_is_its_folders() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt-neox-20b-tokenizer.json");
        let step = dir.path().join("step1000");
        crate::synthetic::write_synthetic_model(
            &step,
            &crate::synthetic::tiny_gpt_neox_config(1),
            Some(&tokenizer),
        )
        .unwrap();
        let options = crate::LoadOptions {
            revision: Some("step1000".into()),
            ..Default::default()
        };
        let model = crate::Model::load(dir.path().to_str().unwrap(), &options).unwrap();
        let err = model.chat().unwrap_err().to_string();
        assert!(err.contains("has no chat template"), "{err}");
        let config = serde_json::json!({"chat_template": "<{{ messages[0].content }}>", "eos_token": "<|endoftext|>"});
        std::fs::write(step.join("tokenizer_config.json"), config.to_string()).unwrap();
        let chat = model.chat().unwrap();
        assert_eq!(
            chat.template
                .render(&[message("user", "Hi")], true)
                .unwrap(),
            "<Hi>"
        );
        let endoftext = chat.tokenizer.inner().token_to_id("<|endoftext|>").unwrap();
        assert!(chat.turn_end_ids.contains(&endoftext));
        assert!(!chat.turn_end_ids.contains(&7));
        // Another tokenizer given: its end tokens (here its EOS, 7).
        let mut model = model;
        model.set_tokenizer(Tokenizer::from_file(&tokenizer, Some(7)).unwrap());
        assert!(model.chat().unwrap().turn_end_ids.contains(&7));
    }

    /// A model folder's template: `tokenizer_config.json`'s string, its list of named
    /// templates, or `chat_template.jinja`; special tokens as text or as `{"content": ...}`.
    #[test]
    fn reads_a_folders_template_and_special_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().to_str().unwrap().to_string();
        let config = dir.path().join("tokenizer_config.json");
        let render = || {
            ModelChat::for_model(&folder, None)
                .and_then(|chat| {
                    chat.template
                        .render(&[message("user", "Hi")], true)
                        .map_err(Error::InvalidArgument)
                })
                .map_err(|e| e.to_string())
        };
        let err = render().unwrap_err();
        assert!(err.contains("has no tokenizer.json"), "{err}");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt-neox-20b-tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let err = render().unwrap_err();
        assert!(err.contains("has no chat template"), "{err}");
        let inline =
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}";
        let written = serde_json::json!({
            "chat_template": inline,
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": false},
        });
        std::fs::write(&config, written.to_string()).unwrap();
        assert_eq!(render().unwrap(), "<s>Hi</s>");
        let listed = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ messages[0].content }}!{{ bos_token }}"},
        ]});
        std::fs::write(&config, listed.to_string()).unwrap();
        assert_eq!(render().unwrap(), "Hi!");
        // special_tokens_map.json fills in the special tokens the config lacks.
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"bos_token": {"content": "<|begin|>"}}"#,
        )
        .unwrap();
        assert_eq!(render().unwrap(), "Hi!<|begin|>");
        // chat_template.jinja wins over the config's template, as in transformers.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "[{{ messages[0].content }}]",
        )
        .unwrap();
        assert_eq!(render().unwrap(), "[Hi]");
        std::fs::write(&config, "{not json").unwrap();
        let err = render().unwrap_err();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn tojson_lays_out_values_as_python_json_dumps() {
        let template = ChatTemplate::new(
            "{{ {'b': [1, 2.5, 1e16, 0.0001, none, true], 'a': 'é\"\\n\\u0001'} | tojson }}\n\
             {{ {'b': 1, 'a': []} | tojson(indent=2, sort_keys=true) }}\n\
             {{ 'é😀' | tojson(ensure_ascii=true) }} {{ [1, 2] | tojson(separators=[',', ':']) }}",
            BTreeMap::new(),
        )
        .unwrap();
        // Python: json.dumps({'b': [1, 2.5, 1e16, 0.0001, None, True], 'a': 'é"\n\x01'}) ...
        assert_eq!(
            template.render(NONE, false).unwrap(),
            "{\"b\": [1, 2.5, 1e+16, 0.0001, null, true], \"a\": \"é\\\"\\n\\u0001\"}\n\
             {\n  \"a\": [],\n  \"b\": 1\n}\n\
             \"\\u00e9\\ud83d\\ude00\" [1,2]"
        );
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(123456.0), "123456.0");
        assert_eq!(python_float(-2.5e-7), "-2.5e-07");
    }

    #[test]
    fn helpers_and_errors() {
        let today = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", BTreeMap::new())
            .unwrap()
            .render(NONE, false)
            .unwrap();
        assert_eq!(today, chrono::Local::now().format("%Y-%m-%d").to_string());
        let bad_format = ChatTemplate::new("{{ strftime_now('%Q') }}", BTreeMap::new())
            .unwrap()
            .render(NONE, false)
            .unwrap_err();
        assert!(bad_format.contains("invalid format \"%Q\""), "{bad_format}");
        let syntax = ChatTemplate::new("{% for m in messages %}", BTreeMap::new())
            .expect_err("an unclosed loop is an error");
        assert!(syntax.contains("syntax error"), "{syntax}");
        // Malformed tags are syntax errors, not panics; a huge indent is refused.
        for source in ["{%}", "{%-%}", "{%+%}", "x {%", "{% generation %}"] {
            let err = ChatTemplate::new(source, BTreeMap::new()).err();
            assert!(err.is_some_and(|e| e.contains("syntax error")), "{source}");
        }
        let wide = ChatTemplate::new("{{ [1] | tojson(indent=1000000000000) }}", BTreeMap::new())
            .unwrap()
            .render(NONE, false)
            .unwrap_err();
        assert!(
            wide.contains("indent must be a width from 0 to 64"),
            "{wide}"
        );
        let roles = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}{% generation -%} {{ m['content'] }} {%- endgeneration %};{% endfor %}",
            BTreeMap::new(),
        )
        .unwrap()
        .render(
            &[
                message("system", "s"),
                message("user", "u"),
                message("assistant", "a"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(roles, "systems;useru;assistanta;");
    }

    #[test]
    fn stop_and_special_tokens_come_from_the_file_and_the_vocabulary() {
        // The tokenizer's own EOS (a plain token here) stops answers too.
        let tokenizer = Tokenizer::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt-neox-20b-tokenizer.json"),
            Some(500),
        )
        .unwrap();
        let vocab = tokenizer.inner();
        // This file's added tokens include ChatML's <|im_end|> besides <|endoftext|> (id 0).
        let endoftext = vocab.token_to_id("<|endoftext|>").unwrap();
        let im_end = vocab.token_to_id("<|im_end|>").unwrap();
        let tokens = gguf_file::Value::Array(
            ["<s>", "</s>", "<eot>", "word"]
                .map(|t| gguf_file::Value::String(t.into()))
                .to_vec(),
        );
        let metadata: HashMap<String, gguf_file::Value> = [
            ("tokenizer.ggml.tokens", tokens),
            ("tokenizer.ggml.bos_token_id", gguf_file::Value::U32(0)),
            ("tokenizer.ggml.eos_token_id", gguf_file::Value::U32(1)),
            ("tokenizer.ggml.eot_token_id", gguf_file::Value::U32(2)),
            ("tokenizer.ggml.eom_token_id", gguf_file::Value::U32(3)),
            ("tokenizer.ggml.padding_token_id", gguf_file::Value::U32(9)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // EOS, EOT and EOM ids from the file, the tokenizer's EOS, and the vocabulary's added
        // end tokens.
        let mut expected = vec![1, 2, 3, 500, endoftext, im_end];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(turn_end_ids(Some(&metadata), &tokenizer), expected);
        // Without a GGUF file's metadata: the tokenizer's EOS and the added end tokens.
        let mut expected = vec![500, endoftext, im_end];
        expected.sort_unstable();
        assert_eq!(turn_end_ids(None, &tokenizer), expected);
        // A padding id past the vocabulary is left out, not an error.
        assert_eq!(
            special_tokens(&metadata),
            BTreeMap::from([
                ("bos_token".to_string(), "<s>".to_string()),
                ("eos_token".to_string(), "</s>".to_string()),
            ])
        );
    }
}
