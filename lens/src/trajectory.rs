//! Prediction trajectories (tuned-lens's `PredictionTrajectory`): what a lens predicts at
//! every layer (rows: the residual entering layer 0 = the embedding at the bottom, up to the
//! model's own output on top) and every token position of one text (columns), with the
//! statistics a cell can be coloured by. Kept as numbers (not the full distributions), so a
//! trajectory is small enough to export as JSON or CSV and to compare across checkpoints.

use std::fmt::Write as _;
use std::path::Path;

use candle_core::{DType, Tensor};
use hooks::{Hooks, Model, Unembedding};
use serde::{Deserialize, Serialize};

use crate::loss::log_softmax;
use crate::{lens_input, Error, Result, TunedLens};

/// What a trajectory cell is coloured by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// Entropy of the lens's distribution, nats.
    Entropy,
    /// Cross-entropy against the next input token, nats.
    CrossEntropy,
    /// KL(model output ‖ lens), nats.
    ForwardKl,
    /// Probability of the lens's top token.
    MaxProbability,
    /// Rank of the next input token under the lens (1 = top).
    Rank,
}

impl Statistic {
    /// Every statistic, in the order of the CLI's help.
    pub const ALL: [Statistic; 5] = [
        Statistic::Entropy,
        Statistic::CrossEntropy,
        Statistic::ForwardKl,
        Statistic::MaxProbability,
        Statistic::Rank,
    ];

    /// Parses `entropy`, `ce` / `cross_entropy`, `kl` / `forward_kl`, `max_prob` /
    /// `max_probability`, `rank`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(
            match name.trim().to_ascii_lowercase().replace('-', "_").as_str() {
                "entropy" => Statistic::Entropy,
                "ce" | "cross_entropy" => Statistic::CrossEntropy,
                "kl" | "forward_kl" => Statistic::ForwardKl,
                "max_prob" | "max_probability" => Statistic::MaxProbability,
                "rank" => Statistic::Rank,
                other => {
                    return Err(Error::Lens(format!(
                        "unknown statistic '{other}' (expected entropy, ce, kl, max_prob or rank)"
                    )))
                }
            },
        )
    }

    /// The short name used in file names and JSON (`entropy`, `ce`, `kl`, `max_prob`, `rank`).
    pub fn key(self) -> &'static str {
        match self {
            Statistic::Entropy => "entropy",
            Statistic::CrossEntropy => "ce",
            Statistic::ForwardKl => "kl",
            Statistic::MaxProbability => "max_prob",
            Statistic::Rank => "rank",
        }
    }

    /// A plot label with the unit.
    pub fn label(self) -> &'static str {
        match self {
            Statistic::Entropy => "entropy (nats)",
            Statistic::CrossEntropy => "cross-entropy vs next token (nats)",
            Statistic::ForwardKl => "KL(model output || lens) (nats)",
            Statistic::MaxProbability => "top-1 probability",
            Statistic::Rank => "rank of next token (1 = top)",
        }
    }

    /// Whether colours are best on a log scale (ranks span 1 .. vocabulary size).
    pub fn log_scale(self) -> bool {
        self == Statistic::Rank
    }
}

/// One layer at one position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// The lens's most likely tokens, best first.
    pub top_ids: Vec<u32>,
    /// Their display text (see [`display_token`]).
    pub top_tokens: Vec<String>,
    /// Their probabilities.
    pub top_probs: Vec<f64>,
    /// Entropy of the lens's distribution, nats.
    pub entropy: f64,
    /// `-log q(next token)`, nats; `None` at the last position.
    pub cross_entropy: Option<f64>,
    /// KL(model output ‖ lens), nats (0 on the output row).
    pub forward_kl: f64,
    /// Probability of the top token.
    pub max_probability: f64,
    /// 1-based rank of the next token (ties counted in its favour); `None` at the last position.
    pub target_rank: Option<u64>,
}

impl Cell {
    /// The value of a statistic (ranks as numbers).
    pub fn value(&self, statistic: Statistic) -> Option<f64> {
        match statistic {
            Statistic::Entropy => Some(self.entropy),
            Statistic::CrossEntropy => self.cross_entropy,
            Statistic::ForwardKl => Some(self.forward_kl),
            Statistic::MaxProbability => Some(self.max_probability),
            Statistic::Rank => self.target_rank.map(|r| r as f64),
        }
    }

    /// The top-1 token's display text.
    pub fn top_token(&self) -> &str {
        self.top_tokens.first().map_or("", String::as_str)
    }

    /// Statistics of one position from the lens's log-probabilities `log_q` and the model
    /// output's `log_p` (both over the vocabulary) and the next token, in f64.
    pub fn from_log_probs(log_q: &[f32], log_p: &[f32], target: Option<u32>, top_k: usize) -> Self {
        let mut entropy = 0.0;
        let mut kl = 0.0;
        for (&q, &p) in log_q.iter().zip(log_p) {
            let (q, p) = (q as f64, p as f64);
            if q > f64::NEG_INFINITY {
                entropy -= q.exp() * q;
            }
            if p > f64::NEG_INFINITY {
                kl += p.exp() * (p - q);
            }
        }
        let mut order: Vec<u32> = (0..log_q.len() as u32).collect();
        let k = top_k.clamp(1, log_q.len());
        let by_prob = |a: &u32, b: &u32| log_q[*b as usize].total_cmp(&log_q[*a as usize]);
        order.select_nth_unstable_by(k - 1, by_prob);
        order.truncate(k);
        order.sort_by(by_prob);
        let top_probs: Vec<f64> = order
            .iter()
            .map(|&i| (log_q[i as usize] as f64).exp())
            .collect();
        let target_log_q = target.map(|t| log_q[t as usize]);
        Cell {
            top_tokens: Vec::new(),
            max_probability: top_probs[0],
            top_probs,
            top_ids: order,
            entropy,
            cross_entropy: target_log_q.map(|q| -(q as f64)),
            forward_kl: kl,
            target_rank: target_log_q.map(|q| 1 + log_q.iter().filter(|&&x| x > q).count() as u64),
        }
    }
}

/// A prediction trajectory of one text under one lens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionTrajectory {
    /// The model (`origin`, e.g. a folder or `EleutherAI/pythia-70m@step1000`).
    pub model: String,
    /// The model's revision, when it has one.
    pub revision: Option<String>,
    /// `logit lens` or `tuned lens`.
    pub lens: String,
    /// The input token ids.
    pub input_ids: Vec<u32>,
    /// Their display text.
    pub tokens: Vec<String>,
    /// Row labels, bottom to top: `0 .. L-1` (the residual entering that layer; 0 is the
    /// embedding) and `output` (the model's own prediction).
    pub layers: Vec<String>,
    /// `cells[layer][position]`.
    pub cells: Vec<Vec<Cell>>,
}

/// How a token is shown in a cell or on an axis: its text with a leading space as `␣`,
/// newlines as `\n`, tabs as `\t`, and an empty decoding as `<id>`.
pub fn display_token(model: &Model, id: u32) -> String {
    let text = match model.tokenizer().and_then(|t| t.token_text(id)) {
        Ok(text) => text,
        Err(_) => return format!("<{id}>"),
    };
    if text.is_empty() {
        return format!("<{id}>");
    }
    text.replace(' ', "␣")
        .replace('\n', "\\n")
        .replace('\t', "\\t")
}

impl PredictionTrajectory {
    /// Runs `model` over `input_ids` once and decodes every layer's residual stream with the
    /// logit lens (`lens: None`) or a tuned lens, keeping the `top_k` best tokens per cell.
    pub fn compute(
        model: &Model,
        lens: Option<&TunedLens>,
        input_ids: &[u32],
        top_k: usize,
    ) -> Result<Self> {
        if input_ids.is_empty() {
            return Err(Error::Lens("the text has no tokens".into()));
        }
        let layers = model.config().num_layers();
        if let Some(lens) = lens {
            lens.check_model(model)?;
        }
        let ids = Tensor::new(input_ids, model.device())?.unsqueeze(0)?;
        let points: Vec<_> = (0..layers).map(lens_input).collect();
        let out = model.forward(&ids, &mut Hooks::new().capture(points.iter().copied()))?;
        let logits = out
            .logits
            .ok_or_else(|| Error::Lens("the forward pass stopped before the logits".into()))?;
        let unembedding: Unembedding = model.unembedding().to_dtype(DType::F32)?;
        let log_p = rows(&logits.squeeze(0)?)?;
        let targets: Vec<Option<u32>> = (0..input_ids.len())
            .map(|i| input_ids.get(i + 1).copied())
            .collect();
        let mut cells = Vec::with_capacity(layers + 1);
        for (layer, point) in points.iter().enumerate() {
            let h = out.captures[point].squeeze(0)?.to_dtype(DType::F32)?;
            let lens_logits = match lens {
                Some(lens) => lens.forward(&h, layer, &unembedding)?,
                None => unembedding.forward(&h)?,
            };
            cells.push(row_cells(
                model,
                &rows(&lens_logits)?,
                &log_p,
                &targets,
                top_k,
            ));
        }
        cells.push(row_cells(model, &log_p, &log_p, &targets, top_k));
        let mut labels: Vec<String> = (0..layers).map(|i| i.to_string()).collect();
        labels.push("output".into());
        Ok(PredictionTrajectory {
            model: model.origin().to_string(),
            revision: model.revision().map(str::to_string),
            lens: if lens.is_some() {
                "tuned lens"
            } else {
                "logit lens"
            }
            .into(),
            input_ids: input_ids.to_vec(),
            tokens: input_ids
                .iter()
                .map(|&id| display_token(model, id))
                .collect(),
            layers: labels,
            cells,
        })
    }

    /// Per position, the lens's prediction depth ([`crate::eval::prediction_depth`]): the
    /// first layer from which its top-1 token is the model's at every later layer, the
    /// number of layers where even the last one's differs.
    pub fn prediction_depths(&self) -> Vec<usize> {
        let Some((output, layers)) = self.cells.split_last() else {
            return Vec::new();
        };
        (0..self.input_ids.len())
            .map(|t| {
                let model_top = output[t].top_ids.first();
                let agrees: Vec<bool> = layers
                    .iter()
                    .map(|row| model_top.is_some() && row[t].top_ids.first() == model_top)
                    .collect();
                crate::eval::prediction_depth(&agrees)
            })
            .collect()
    }

    /// `values[layer][position]` of a statistic (`None` where it is undefined: the target
    /// statistics at the last position).
    pub fn values(&self, statistic: Statistic) -> Vec<Vec<Option<f64>>> {
        self.cells
            .iter()
            .map(|row| row.iter().map(|c| c.value(statistic)).collect())
            .collect()
    }

    /// `self − other` of a statistic, cell by cell; both must be trajectories of the same
    /// tokens through models with the same number of layers.
    pub fn difference(&self, other: &Self, statistic: Statistic) -> Result<Vec<Vec<Option<f64>>>> {
        if self.input_ids != other.input_ids || self.layers != other.layers {
            return Err(Error::Lens(format!(
                "cannot subtract trajectories of different inputs or layer counts ({} tokens x {} rows vs {} x {})",
                self.input_ids.len(),
                self.layers.len(),
                other.input_ids.len(),
                other.layers.len()
            )));
        }
        let (a, b) = (self.values(statistic), other.values(statistic));
        Ok(a.iter()
            .zip(&b)
            .map(|(ra, rb)| {
                ra.iter()
                    .zip(rb)
                    .map(|(x, y)| Some((*x)? - (*y)?))
                    .collect()
            })
            .collect())
    }

    /// A one-line description for titles: model, revision and lens.
    pub fn description(&self) -> String {
        let name = Path::new(&self.model)
            .file_name()
            .map_or(self.model.clone(), |n| n.to_string_lossy().into_owned());
        let name = name.trim_end_matches(".gguf");
        match &self.revision {
            Some(rev) if !name.contains(rev.as_str()) => format!("{name} @ {rev}, {}", self.lens),
            _ => format!("{name}, {}", self.lens),
        }
    }

    /// Writes the trajectory as pretty JSON (atomically).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        Ok(hooks::atomic::write_json(path, self)?)
    }

    /// Reads a trajectory written by [`PredictionTrajectory::write_json`].
    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| hooks::Error::io(path, e))?;
        let bad = |m: String| {
            Error::Lens(format!(
                "{}: not a prediction trajectory: {m}",
                path.display()
            ))
        };
        let trajectory: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        trajectory.check_shape().map_err(bad)?;
        Ok(trajectory)
    }

    /// Whether the tables agree in size: one row of cells per layer label, one cell per
    /// token, one token per input id, and every cell with its top tokens (a file edited by
    /// hand or written by something else could break any of these).
    fn check_shape(&self) -> std::result::Result<(), String> {
        let positions = self.input_ids.len();
        if positions == 0 || self.tokens.len() != positions {
            return Err(format!(
                "{} input ids and {} tokens (they must be equal and not zero)",
                positions,
                self.tokens.len()
            ));
        }
        if self.cells.len() != self.layers.len() || self.layers.is_empty() {
            return Err(format!(
                "{} rows of cells for {} layers",
                self.cells.len(),
                self.layers.len()
            ));
        }
        for (layer, row) in self.layers.iter().zip(&self.cells) {
            if row.len() != positions {
                return Err(format!(
                    "row {layer} has {} cells for {positions} tokens",
                    row.len()
                ));
            }
            if let Some(pos) = row.iter().position(|c| {
                c.top_ids.is_empty()
                    || c.top_ids.len() != c.top_tokens.len()
                    || c.top_ids.len() != c.top_probs.len()
            }) {
                return Err(format!(
                    "the cell of row {layer} at position {pos} has no top tokens, or its top ids, tokens and probabilities differ in number"
                ));
            }
        }
        Ok(())
    }

    /// The trajectory as CSV, one line per cell: `layer, position, token, next_token, top1,
    /// top1_prob, entropy, cross_entropy, forward_kl, max_probability, target_rank` (empty
    /// fields where undefined; text fields quoted).
    pub fn to_csv(&self) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
        let mut out = String::from(
            "layer,position,token,next_token,top1,top1_prob,entropy,cross_entropy,forward_kl,max_probability,target_rank\n",
        );
        for (layer, row) in self.layers.iter().zip(&self.cells) {
            for (pos, cell) in row.iter().enumerate() {
                let next = self.tokens.get(pos + 1).map_or(String::new(), |t| quote(t));
                let _ = writeln!(
                    out,
                    "{layer},{pos},{},{next},{},{},{},{},{},{},{}",
                    quote(&self.tokens[pos]),
                    quote(cell.top_token()),
                    cell.top_probs[0],
                    cell.entropy,
                    opt(cell.cross_entropy),
                    cell.forward_kl,
                    cell.max_probability,
                    cell.target_rank.map_or(String::new(), |r| r.to_string()),
                );
            }
        }
        out
    }

    /// Writes [`PredictionTrajectory::to_csv`] to `path` (atomically).
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        Ok(hooks::atomic::write(path, self.to_csv().as_bytes())?)
    }
}

/// `[seq, vocab]` logits -> log-probabilities as rows of f32.
fn rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(log_softmax(&logits.to_dtype(DType::F32)?)?.to_vec2()?)
}

fn row_cells(
    model: &Model,
    log_q: &[Vec<f32>],
    log_p: &[Vec<f32>],
    targets: &[Option<u32>],
    top_k: usize,
) -> Vec<Cell> {
    log_q
        .iter()
        .zip(log_p)
        .zip(targets)
        .map(|((q, p), t)| {
            let mut cell = Cell::from_log_probs(q, p, *t, top_k);
            cell.top_tokens = cell
                .top_ids
                .iter()
                .map(|&id| display_token(model, id))
                .collect();
            cell
        })
        .collect()
}
