//! Hook point names: the places in a forward pass where a tensor can be read or replaced.
//!
//! Canonical names follow the module paths that sparsify and delphi use (`layers.3`,
//! `layers.3.mlp`, ...). TransformerLens names (`blocks.3.hook_resid_post`, ...) and the
//! Hugging Face module names (`embed_in`, `final_layer_norm`, ...) are accepted as aliases.

use std::fmt;

/// One place in the forward pass. The tensor at a hook point has shape `[batch, seq, width]`
/// (one row per token), except an attention pattern's `[batch, heads, seq, seq]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// Token embeddings: the input to layer 0.
    Embed,
    /// The attention weights of layer `i`, `[batch, heads, query, key]`: each query's
    /// softmax over the keys up to its own position (TransformerLens's `hook_pattern`).
    /// Replacing it re-weights the values. It is kept only when a hook asks for it: the
    /// CPU kernel then writes it out, and the GPU's bf16 flash attention, which never forms
    /// it, gives way to the unfused path.
    AttentionPattern(usize),
    /// The attention heads' outputs of layer `i`, concatenated head by head: the input of
    /// the attention's output projection, `heads * head_dim` wide (TransformerLens's
    /// `hook_z`, on which attention SAEs are trained).
    AttentionHeads(usize),
    /// Output of the attention module of layer `i`, before it is added to the residual.
    Attention(usize),
    /// Input of the MLP of layer `i` (the output of its pre-MLP norm); a transcoder's input.
    MlpInput(usize),
    /// Output of the MLP of layer `i`, before it is added to the residual.
    Mlp(usize),
    /// Residual stream after layer `i`: the input to layer `i + 1`.
    Layer(usize),
    /// Residual stream after the final norm.
    FinalNorm,
    /// Output logits.
    Logits,
}

/// How an architecture spells the attention module in canonical names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionName {
    /// GPT-NeoX: `layers.{i}.attention`.
    Attention,
    /// Llama family: `layers.{i}.self_attn`.
    SelfAttn,
}

impl AttentionName {
    fn as_str(self) -> &'static str {
        match self {
            AttentionName::Attention => "attention",
            AttentionName::SelfAttn => "self_attn",
        }
    }

    /// The attention's output projection: `dense` (GPT-NeoX) or `o_proj` (Llama).
    fn output_projection(self) -> &'static str {
        match self {
            AttentionName::Attention => "dense",
            AttentionName::SelfAttn => "o_proj",
        }
    }
}

impl HookPoint {
    /// Position in forward order: sorting by this key gives the order tensors are computed in
    /// (the embedding, then each layer's points, then the final norm and the logits; a layer
    /// index past any model's still sorts as a layer).
    pub fn order_key(self) -> (u8, usize, u8) {
        match self {
            HookPoint::Embed => (0, 0, 0),
            HookPoint::AttentionPattern(i) => (1, i, 0),
            HookPoint::AttentionHeads(i) => (1, i, 1),
            HookPoint::Attention(i) => (1, i, 2),
            HookPoint::MlpInput(i) => (1, i, 3),
            HookPoint::Mlp(i) => (1, i, 4),
            HookPoint::Layer(i) => (1, i, 5),
            HookPoint::FinalNorm => (2, 0, 0),
            HookPoint::Logits => (2, 0, 1),
        }
    }

    /// Whether the tensor here holds one row per token (`[batch, seq, width]`), as activation
    /// caches, streams and SAEs need: every hook point but an attention pattern.
    pub fn is_per_token(self) -> bool {
        !matches!(self, HookPoint::AttentionPattern(_))
    }

    /// The layer this hook point belongs to, if any.
    pub fn layer(self) -> Option<usize> {
        match self {
            HookPoint::AttentionPattern(i)
            | HookPoint::AttentionHeads(i)
            | HookPoint::Attention(i)
            | HookPoint::MlpInput(i)
            | HookPoint::Mlp(i)
            | HookPoint::Layer(i) => Some(i),
            _ => None,
        }
    }

    /// Every hook point of a model with `num_layers` layers, in forward order.
    pub fn all(num_layers: usize) -> Vec<HookPoint> {
        let mut points = vec![HookPoint::Embed];
        for i in 0..num_layers {
            points.extend([
                HookPoint::AttentionPattern(i),
                HookPoint::AttentionHeads(i),
                HookPoint::Attention(i),
                HookPoint::MlpInput(i),
                HookPoint::Mlp(i),
                HookPoint::Layer(i),
            ]);
        }
        points.extend([HookPoint::FinalNorm, HookPoint::Logits]);
        points
    }

    /// The canonical name, spelling the attention module as the architecture does.
    pub fn name(self, attention: AttentionName) -> String {
        match self {
            HookPoint::Embed => "embed".into(),
            HookPoint::AttentionPattern(i) => format!("layers.{i}.{}.pattern", attention.as_str()),
            HookPoint::AttentionHeads(i) => format!(
                "layers.{i}.{}.{}.input",
                attention.as_str(),
                attention.output_projection()
            ),
            HookPoint::Attention(i) => format!("layers.{i}.{}", attention.as_str()),
            HookPoint::MlpInput(i) => format!("layers.{i}.mlp.input"),
            HookPoint::Mlp(i) => format!("layers.{i}.mlp"),
            HookPoint::Layer(i) => format!("layers.{i}"),
            HookPoint::FinalNorm => "final_norm".into(),
            HookPoint::Logits => "logits".into(),
        }
    }

    /// Parses a canonical name or an alias, without checking the layer index.
    ///
    /// Aliases: `embed_in`, `embed_tokens`, `hook_embed`; `blocks.{i}.hook_resid_pre`
    /// (the residual before block i), `blocks.{i}.hook_resid_post`, `blocks.{i}.hook_attn_out`,
    /// `blocks.{i}.hook_mlp_out`, `blocks.{i}.attn.hook_z`, `blocks.{i}.attn.hook_pattern`;
    /// `layers.{i}.attention` / `.self_attn` / `.attn`, each also with `.pattern`; the output
    /// projection (`layers.{i}.attention.dense`, `layers.{i}.self_attn.o_proj`, `attn` with
    /// either) as the attention's output, and with `.input` as the heads' outputs;
    /// `final_layer_norm`, `norm`; `lm_head`, `embed_out`, `unembed`.
    pub fn parse(name: &str) -> Option<HookPoint> {
        let name = name.trim();
        match name {
            "embed" | "embed_in" | "embed_tokens" | "hook_embed" => return Some(HookPoint::Embed),
            "final_norm" | "final_layer_norm" | "norm" => return Some(HookPoint::FinalNorm),
            "logits" | "lm_head" | "embed_out" | "unembed" => return Some(HookPoint::Logits),
            _ => {}
        }
        let (prefix, rest) = name.split_once('.')?;
        let (index, suffix) = match rest.split_once('.') {
            Some((index, suffix)) => (index, Some(suffix)),
            None => (rest, None),
        };
        let i: usize = index.parse().ok()?;
        match (prefix, suffix) {
            ("layers", None) => Some(HookPoint::Layer(i)),
            ("layers", Some("attention" | "self_attn" | "attn")) => Some(HookPoint::Attention(i)),
            // The output projection's output is the attention's output.
            (
                "layers",
                Some("attention.dense" | "self_attn.o_proj" | "attn.dense" | "attn.o_proj"),
            ) => Some(HookPoint::Attention(i)),
            ("layers", Some("mlp")) => Some(HookPoint::Mlp(i)),
            ("layers", Some("mlp.input")) => Some(HookPoint::MlpInput(i)),
            ("layers", Some("attention.pattern" | "self_attn.pattern" | "attn.pattern")) => {
                Some(HookPoint::AttentionPattern(i))
            }
            (
                "layers",
                Some(
                    "attention.dense.input"
                    | "self_attn.o_proj.input"
                    | "attn.dense.input"
                    | "attn.o_proj.input",
                ),
            ) => Some(HookPoint::AttentionHeads(i)),
            ("blocks", Some("hook_resid_post")) => Some(HookPoint::Layer(i)),
            ("blocks", Some("hook_resid_pre")) => Some(match i {
                0 => HookPoint::Embed,
                _ => HookPoint::Layer(i - 1),
            }),
            ("blocks", Some("hook_attn_out")) => Some(HookPoint::Attention(i)),
            ("blocks", Some("hook_mlp_out")) => Some(HookPoint::Mlp(i)),
            ("blocks", Some("attn.hook_z")) => Some(HookPoint::AttentionHeads(i)),
            ("blocks", Some("attn.hook_pattern")) => Some(HookPoint::AttentionPattern(i)),
            _ => None,
        }
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters other than `.`
/// (so `layers.*` matches `layers.3` but not `layers.3.mlp`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let name: Vec<&str> = name.split('.').collect();
    pattern.len() == name.len() && pattern.iter().zip(&name).all(|(p, n)| part_match(p, n))
}

/// Whether `text` matches `pattern`, whose `*`s match any run of characters: greedily, going
/// back only to the last `*` on a mismatch (trying every split at every `*` took time
/// exponential in their number).
fn part_match(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), text.chars().collect());
    let (mut p, mut t) = (0, 0);
    // After the last `*` seen: where the pattern goes on, and the text it has swallowed up to.
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                last_star = Some((p + 1, t));
                p += 1;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match last_star {
                Some((after, swallowed)) => {
                    last_star = Some((after, swallowed + 1));
                    p = after;
                    t = swallowed + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

impl PartialOrd for HookPoint {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HookPoint {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

impl fmt::Display for HookPoint {
    /// Displays the GPT-NeoX spelling; use [`HookPoint::name`] for a specific architecture.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name(AttentionName::Attention))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_round_trip() {
        for attention in [AttentionName::Attention, AttentionName::SelfAttn] {
            for point in HookPoint::all(3) {
                assert_eq!(HookPoint::parse(&point.name(attention)), Some(point));
            }
        }
        let names = |point: HookPoint| {
            [AttentionName::Attention, AttentionName::SelfAttn].map(|a| point.name(a))
        };
        assert_eq!(
            names(HookPoint::AttentionHeads(2)),
            [
                "layers.2.attention.dense.input",
                "layers.2.self_attn.o_proj.input"
            ]
        );
        assert_eq!(
            names(HookPoint::AttentionPattern(2)),
            ["layers.2.attention.pattern", "layers.2.self_attn.pattern"]
        );
    }

    #[test]
    fn transformer_lens_aliases() {
        assert_eq!(
            HookPoint::parse("blocks.0.hook_resid_pre"),
            Some(HookPoint::Embed)
        );
        assert_eq!(
            HookPoint::parse("blocks.4.hook_resid_pre"),
            Some(HookPoint::Layer(3))
        );
        assert_eq!(
            HookPoint::parse("blocks.4.hook_resid_post"),
            Some(HookPoint::Layer(4))
        );
        assert_eq!(
            HookPoint::parse("blocks.2.hook_attn_out"),
            Some(HookPoint::Attention(2))
        );
        assert_eq!(
            HookPoint::parse("blocks.2.hook_mlp_out"),
            Some(HookPoint::Mlp(2))
        );
        assert_eq!(
            HookPoint::parse("blocks.2.attn.hook_z"),
            Some(HookPoint::AttentionHeads(2))
        );
        assert_eq!(
            HookPoint::parse("blocks.3.attn.hook_pattern"),
            Some(HookPoint::AttentionPattern(3))
        );
        assert_eq!(HookPoint::parse("embed_in"), Some(HookPoint::Embed));
        assert_eq!(
            HookPoint::parse("final_layer_norm"),
            Some(HookPoint::FinalNorm)
        );
    }

    #[test]
    fn rejects_unknown_names() {
        for bad in [
            "",
            "layers",
            "layers.x",
            "layers.1.foo",
            "layers.1.self_attn.dense.input",
            "layers.1.attention.o_proj",
            "layers.1.mlp.dense.input",
            "layers.1.attention.query_key_value.input",
            "layers.1.attention.dense.input.input",
            "layers.1.mlp.pattern",
            "layers.1.pattern",
            "blocks.1",
            "layers.-1",
            "mlp",
        ] {
            assert_eq!(HookPoint::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn globs_match_within_one_part() {
        assert!(glob_match("layers.*", "layers.12"));
        assert!(!glob_match("layers.*", "layers.12.mlp"));
        assert!(glob_match("layers.*.mlp", "layers.0.mlp"));
        assert!(glob_match("layers.1*", "layers.15"));
        assert!(!glob_match("layers.1*", "layers.2"));
        assert!(glob_match("*ayer*", "layers"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYcZ"));
        assert!(glob_match("**", ""));
        assert!(glob_match("é*ü", "éaü"));
        // Many stars answer at once (trying every split took minutes).
        let stars = format!("{}z", "*".repeat(40));
        assert!(!glob_match(&stars, "attention_pattern_of_a_long_name"));
        assert!(glob_match(&stars, "attention_pattern_of_a_long_namez"));
    }

    #[test]
    fn forward_order() {
        let mut points = vec![
            HookPoint::Logits,
            HookPoint::Layer(0),
            HookPoint::Mlp(1),
            HookPoint::Embed,
            HookPoint::Attention(1),
            HookPoint::FinalNorm,
        ];
        points.push(HookPoint::AttentionHeads(1));
        points.push(HookPoint::AttentionPattern(1));
        // A layer past any model's is still a layer, neither the final norm nor the logits.
        points.push(HookPoint::AttentionPattern(usize::MAX));
        points.sort();
        assert_eq!(
            points.remove(points.len() - 3),
            HookPoint::AttentionPattern(usize::MAX)
        );
        assert_eq!(
            points,
            vec![
                HookPoint::Embed,
                HookPoint::Layer(0),
                HookPoint::AttentionPattern(1),
                HookPoint::AttentionHeads(1),
                HookPoint::Attention(1),
                HookPoint::Mlp(1),
                HookPoint::FinalNorm,
                HookPoint::Logits
            ]
        );
    }
}
