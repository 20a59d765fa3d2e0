//! What the language model is told, and how its answers are read.
//!
//! The formats follow delphi's conventions so that scores are comparable: activating tokens
//! are wrapped in `<<` `>>` (runs of tokens above 0.3 of the example's maximum), an
//! `Activations:` line lists `("token" : n)` with n in 0-10, the explainer ends its answer
//! with a line starting `[EXPLANATION]:`, the scorers answer with a list of 0/1, one per
//! numbered example, the intruder scorer with `[RESPONSE]:` and the intruder's number, and the
//! simulation scorer's answer is read, not generated: `token<tab>activation` lines whose
//! activations are hidden.
//! The wording and the few-shot examples are our own.

use crate::llm::Message;

/// Fraction of an example's maximum above which a token is marked.
pub const HIGHLIGHT_THRESHOLD: f32 = 0.3;

/// The marker the explainer's answer ends with.
pub const EXPLANATION_MARKER: &str = "[EXPLANATION]:";

/// An example ready to show: its tokens as text and the latent's activation per token.
#[derive(Debug, Clone, PartialEq)]
pub struct ShownExample {
    /// Text of each token (concatenated they give the window's text).
    pub tokens: Vec<String>,
    /// Activation per token.
    pub activations: Vec<f32>,
    /// Activation per token as an integer 0-10 relative to the latent's maximum.
    pub normalized: Vec<u8>,
}

/// The text with each run of `marked` tokens wrapped in `<<` `>>`.
pub fn highlight(tokens: &[String], marked: &[bool]) -> String {
    let mut out = String::new();
    let mut open = false;
    for (token, &mark) in tokens.iter().zip(marked) {
        if mark && !open {
            out.push_str("<<");
            open = true;
        } else if !mark && open {
            out.push_str(">>");
            open = false;
        }
        out.push_str(token);
    }
    if open {
        out.push_str(">>");
    }
    out
}

/// Which tokens of an example count as active: above [`HIGHLIGHT_THRESHOLD`] of its maximum.
pub fn active_tokens(activations: &[f32]) -> Vec<bool> {
    let max = activations.iter().copied().fold(0.0, f32::max);
    activations
        .iter()
        .map(|&a| max > 0.0 && a > HIGHLIGHT_THRESHOLD * max)
        .collect()
}

/// `Activations: ("tok" : 7), ("other" : 3)` for the marked tokens.
fn activation_line(example: &ShownExample, marked: &[bool]) -> String {
    let entries: Vec<String> = example
        .tokens
        .iter()
        .zip(&example.normalized)
        .zip(marked)
        .filter(|(_, &m)| m)
        .map(|((token, n), _)| format!("(\"{token}\" : {n})"))
        .collect();
    format!("Activations: {}", entries.join(", "))
}

const EXPLAINER_SYSTEM: &str = "\
You study the internals of a language model. One of its latent features is active on some \
tokens of the text excerpts you will be shown. In each excerpt the tokens where the feature \
is active are wrapped in << and >>, and the line after the excerpt gives each marked token \
with the feature's strength on it, from 1 (weak) to 10 (strongest).

Work out what the feature responds to. Look both at the marked tokens and at the words \
around them. Then describe the feature in one short phrase or sentence:
- be specific but cover all the excerpts, not just one;
- do not mention the << >> markers or the numbers;
- write plain prose, not a list.
End your answer with a line that starts with [EXPLANATION]: followed by the description.";

/// Few-shot demonstrations: (excerpts with their activation lines, answer).
const EXPLAINER_SHOTS: [(&str, &str); 2] = [
    (
        "Example 1: The meeting was moved to<< Tuesday>> because the hall was booked.
Activations: (\" Tuesday\" : 10)
Example 2: She has lived in Lisbon since<< March>> and plans to stay.
Activations: (\" March\" : 8)
Example 3: Shops close early on<< Sundays>> in most of the town.
Activations: (\" Sundays\" : 9)",
        "The marked words are all days of the week or months, each naming when something happens.
[EXPLANATION]: Names of days and months used as time expressions.",
    ),
    (
        "Example 1: The results were<< not>> as good as we had hoped.
Activations: (\" not\" : 10)
Example 2: He<< never>> answered the letter.
Activations: (\" never\" : 9)
Example 3: There is<< no>> evidence that the drug works.
Activations: (\" no\" : 7)",
        "Each marked token turns the statement around: not, never, no.
[EXPLANATION]: Negation words such as \"not\", \"never\" and \"no\".",
    ),
];

/// The explainer's conversation for a latent's examples.
pub fn explainer_messages(examples: &[ShownExample], show_activations: bool) -> Vec<Message> {
    let mut messages = vec![Message::system(EXPLAINER_SYSTEM)];
    for (shot, answer) in EXPLAINER_SHOTS {
        let shot = if show_activations {
            shot.to_string()
        } else {
            shot.lines()
                .filter(|l| !l.starts_with("Activations:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        messages.push(Message::user(shot));
        messages.push(Message::assistant(answer));
    }
    let mut body = String::new();
    for (i, example) in examples.iter().enumerate() {
        let marked = active_tokens(&example.activations);
        body.push_str(&format!(
            "Example {}: {}\n",
            i + 1,
            highlight(&example.tokens, &marked)
        ));
        if show_activations {
            body.push_str(&activation_line(example, &marked));
            body.push('\n');
        }
    }
    messages.push(Message::user(body.trim_end().to_string()));
    messages
}

/// The explanation in an explainer's answer: the text after the *last* `[EXPLANATION]:`
/// marker that has any, up to the end of that line (a marker quoted earlier, e.g. in
/// reasoning, is not taken; a trailing empty marker, as a small model's cut-off answer may
/// end, is passed over). `None` when no marker has text after it.
pub fn parse_explanation(answer: &str) -> Option<String> {
    answer
        .rmatch_indices(EXPLANATION_MARKER)
        .find_map(|(at, marker)| {
            let rest = answer[at + marker.len()..].trim_start();
            let line = rest.lines().next().unwrap_or("").trim();
            (!line.is_empty() && !line.starts_with(EXPLANATION_MARKER)).then(|| line.to_string())
        })
}

/// Which test a scorer's prompt asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierTask {
    /// Does the text contain what the explanation describes? (plain text)
    Detection,
    /// Are the marked tokens the ones the explanation describes? (marked text)
    Fuzzing,
}

const DETECTION_SYSTEM: &str = "\
You check descriptions of a language model's latent features. You get a description of a \
feature and a numbered list of text excerpts. For each excerpt decide whether the feature, as \
described, would be active somewhere in it: 1 if yes, 0 if no. Most descriptions fit only some \
excerpts. Answer with nothing but a list of 0s and 1s in square brackets, one entry per \
excerpt in order, for example [1, 0, 0, 1, 0].";

const FUZZING_SYSTEM: &str = "\
You check descriptions of a language model's latent features. You get a description of a \
feature and a numbered list of text excerpts in which some tokens are wrapped in << and >>. \
For each excerpt decide whether the marked tokens are the ones where the feature, as described, \
would be active: 1 if all marked tokens fit the description, 0 if any does not. Answer with \
nothing but a list of 0s and 1s in square brackets, one entry per excerpt in order, for \
example [0, 1, 1, 0, 0].";

const DETECTION_SHOT: (&str, &str, &str) = (
    "Words for family members.",
    "Example 0: My sister and I drove to the coast last summer.
Example 1: The engine needs a new filter before winter.
Example 2: His grandfather built the house in 1921.
Example 3: Prices rose by four percent over the year.
Example 4: We stayed with her aunt for a week.",
    "[1, 0, 1, 0, 1]",
);

const FUZZING_SHOT: (&str, &str, &str) = (
    "Words for family members.",
    "Example 0: My<< sister>> and I drove to the coast last summer.
Example 1: The<< engine>> needs a new filter before winter.
Example 2: His<< grandfather>> built the house in 1921.
Example 3: Prices rose by four<< percent>> over the year.
Example 4: We<< stayed>> with her aunt for a week.",
    "[1, 0, 1, 0, 0]",
);

fn classifier_user(explanation: &str, examples: &str) -> String {
    format!("Feature description: {explanation}\n\nExcerpts:\n{examples}")
}

/// A scorer's conversation: the explanation and excerpts numbered from 0, already
/// highlighted for fuzzing.
pub fn classifier_messages(
    task: ClassifierTask,
    explanation: &str,
    excerpts: &[String],
) -> Vec<Message> {
    let (system, (shot_explanation, shot_examples, shot_answer)) = match task {
        ClassifierTask::Detection => (DETECTION_SYSTEM, DETECTION_SHOT),
        ClassifierTask::Fuzzing => (FUZZING_SYSTEM, FUZZING_SHOT),
    };
    let numbered: Vec<String> = excerpts
        .iter()
        .enumerate()
        .map(|(i, text)| format!("Example {i}: {text}"))
        .collect();
    vec![
        Message::system(system),
        Message::user(classifier_user(shot_explanation, shot_examples)),
        Message::assistant(shot_answer),
        Message::user(classifier_user(explanation, &numbered.join("\n"))),
    ]
}

/// The marker the intruder scorer's answer gives the intruder's number after.
pub const RESPONSE_MARKER: &str = "[RESPONSE]:";

const INTRUDER_SYSTEM: &str = "\
You look for the odd one out. You get a numbered list of text excerpts; in most of them some \
tokens are wrapped in << and >>. All excerpts but one share something: a topic, a word, a \
spelling, a grammatical role, usually visible in the marked tokens. Exactly one excerpt, the \
intruder, does not belong with the others. Keep your reasoning short, then end with a line \
[RESPONSE]: followed by the number of the intruder and nothing else.";

/// Few-shot turns: the excerpts, then the answer.
const INTRUDER_SHOTS: [(&str, &str); 2] = [
    (
        "Example 0: We ordered<< pasta>> and a salad for the table.
Example 1: She baked fresh<< bread>> every Sunday morning.
Example 2: The<< committee>> will vote on the budget in May.
Example 3: He spread<< butter>> on the warm toast.",
        "Three excerpts mark a food; example 2 marks a group of people. [RESPONSE]: 2",
    ),
    (
        "Example 0: The river rose<< quickly>> after the storm.
Example 1: She answered the letter<< politely>> but firmly.
Example 2: They walked<< slowly>> along the old wall.
Example 3: The<< train>> left at nine.
Example 4: He closed the door<< quietly>> behind him.",
        "All marks but one are adverbs ending in -ly; example 3 marks a noun. [RESPONSE]: 3",
    ),
];

/// The intruder scorer's conversation: excerpts numbered from 0, marked, one of them the
/// intruder.
pub fn intruder_messages(excerpts: &[String]) -> Vec<Message> {
    let numbered = |texts: &[String]| -> String {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| format!("Example {i}: {text}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut messages = vec![Message::system(INTRUDER_SYSTEM)];
    for (shown, answer) in INTRUDER_SHOTS {
        messages.push(Message::user(format!("Excerpts:\n{shown}")));
        messages.push(Message::assistant(answer));
    }
    messages.push(Message::user(format!("Excerpts:\n{}", numbered(excerpts))));
    messages
}

/// The intruder's number in an intruder scorer's reply: the integer right after the *last*
/// `[RESPONSE]:` followed by one (a guess quoted in earlier reasoning is not taken), if it
/// is below `shown`. `None` otherwise.
pub fn parse_intruder(answer: &str, shown: usize) -> Option<usize> {
    answer
        .rmatch_indices(RESPONSE_MARKER)
        .find_map(|(at, marker)| {
            let digits: String = answer[at + marker.len()..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            (!digits.is_empty()).then_some(digits)
        })
        .and_then(|digits| digits.parse().ok())
        .filter(|&n| n < shown)
}

/// The activation levels the simulation scorer reads the model's belief over, as the tokens
/// that would follow a token's tab: the digits `"0"` to `"9"`. One digit each, so that every
/// tokenizer has each level as one token: delphi's and OpenAI's 0-10 scale cannot be read
/// where "10" is two tokens (SmolLM2's, Llama 2's, Mistral's tokenizers split digits). The
/// scorer rescales the expected level to 0-10, which leaves correlations unchanged.
pub const SIMULATION_LEVELS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// What the simulation scorer's answer holds in place of an activation it does not show.
pub const UNKNOWN_ACTIVATION: &str = "unknown";

const SIMULATION_SYSTEM: &str = "\
You predict where a latent feature of a language model is active. You get a description of \
the feature, then a text split into tokens: one token per line, a tab, and the feature's \
activation on that token, an integer from 0 (not active) to 9 (most active). Most tokens have \
0; only the tokens that fit the description, in the context the description gives, have more. \
In your answer the activations are hidden and written as unknown; what counts is the number \
you would put in each one's place.";

/// Few-shot turns: (feature description, (token, activation) pairs).
const SIMULATION_SHOTS: [(&str, &[(&str, u8)]); 3] = [
    (
        "Names of days and months used as time expressions.",
        &[
            ("The", 0),
            (" meeting", 0),
            (" was", 0),
            (" moved", 0),
            (" to", 0),
            (" Tuesday", 9),
            (" because", 0),
            (" the", 0),
            (" hall", 0),
            (" was", 0),
            (" booked", 0),
            (" in", 0),
            (" March", 7),
            (".", 0),
        ],
    ),
    (
        "Negation words such as \"not\", \"never\" and \"no\".",
        &[
            ("He", 0),
            (" said", 0),
            (" he", 0),
            (" would", 1),
            (" never", 8),
            (" go", 0),
            (" back", 0),
            (",", 0),
            (" and", 0),
            (" he", 0),
            (" did", 0),
            (" not", 9),
            (".", 0),
        ],
    ),
    (
        "Words for pets such as cats and dogs.",
        &[
            ("Rain", 0),
            (" is", 0),
            (" expected", 0),
            (" in", 0),
            (" the", 0),
            (" north", 0),
            (" by", 0),
            (" evening", 0),
            (".", 0),
        ],
    ),
];

/// A token as the simulation scorer shows it on its line: backslashes doubled, line breaks,
/// carriage returns and tabs written `\n`, `\r`, `\t`, so that each token keeps one line and
/// one tab and no two tokens look alike.
fn simulation_token(token: &str) -> String {
    token
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
        .replace('\t', "\\t")
}

fn simulation_user(explanation: &str) -> String {
    format!("Feature description: {}", explanation.trim())
}

/// The simulation scorer's conversation up to its answer: instructions, demonstrations with
/// their activations shown, then the explanation to simulate.
pub fn simulation_messages(explanation: &str) -> Vec<Message> {
    let mut messages = vec![Message::system(SIMULATION_SYSTEM)];
    for (description, tokens) in SIMULATION_SHOTS {
        messages.push(Message::user(simulation_user(description)));
        let lines: Vec<String> = tokens
            .iter()
            .map(|(token, level)| format!("{}\t{level}", simulation_token(token)))
            .collect();
        messages.push(Message::assistant(lines.join("\n")));
    }
    messages.push(Message::user(simulation_user(explanation)));
    messages
}

/// The simulation scorer's answer for `tokens`, in pieces that each end with a token's tab,
/// where the model's belief about that token's activation is read; every activation is
/// [`UNKNOWN_ACTIVATION`] (delphi's and OpenAI's all-at-once simulation), so each prediction
/// sees the text up to its token and none of the others' values.
pub fn simulation_answer(tokens: &[String]) -> Vec<String> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let line = format!("{}\t", simulation_token(token));
            if i == 0 {
                line
            } else {
                format!("{UNKNOWN_ACTIVATION}\n{line}")
            }
        })
        .collect()
}

/// The surprisal scorer's few-shot demonstrations: a description, then sentences it fits.
const SURPRISAL_SHOTS: [(&str, &[&str]); 3] = [
    (
        "Months of the year, mostly in dates.",
        &[
            "The bridge opened to traffic in March 1932, four years after work began.",
            "Her last album came out on 14 October 2019 to mixed reviews.",
        ],
    ),
    (
        "Words about water and the sea.",
        &[
            "Fishing boats waited in the harbour until the tide turned.",
            "The river floods the lower fields every spring.",
        ],
    ),
    (
        "Closing brackets in program code.",
        &[
            "if (count > limit) { reset(buffer); }",
            "values = [square(x) for x in range(10)]",
        ],
    ),
];

/// What the surprisal scorer puts where an explanation would go for its baseline: a
/// description that says nothing about the text.
pub const SURPRISAL_PLACEHOLDER: &str = "Sentences on unrelated topics.";

/// The surprisal scorer's plain-text prompt (for a base model, no chat template): how
/// descriptions and sentences alternate, three demonstrations, then `description` and the
/// line after which each excerpt's text is scored. delphi's layout (`Description:` and
/// `Sentences:` lines), our own wording and demonstrations.
pub fn surprisal_prompt(description: &str) -> String {
    let mut prompt = String::from(
        "Each description below names a pattern in text; the sentences after it show that \
         pattern.\n\n",
    );
    let block = |description: &str| format!("Description:\n{}\nSentences:\n", description.trim());
    for (shot, sentences) in SURPRISAL_SHOTS {
        prompt.push_str(&block(shot));
        for sentence in sentences {
            prompt.push_str(sentence);
            prompt.push('\n');
        }
        prompt.push('\n');
    }
    prompt.push_str(&block(description));
    prompt
}

/// The 0/1 answers in a scorer's reply: the *last* `[...]` holding exactly `expected`
/// entries, each 0, 1, true or false (a draft list in earlier reasoning is not taken, as
/// for [`parse_explanation`]). `None` otherwise.
pub fn parse_predictions(answer: &str, expected: usize) -> Option<Vec<bool>> {
    let mut found = None;
    for (open, _) in answer.match_indices('[') {
        let after = &answer[open + 1..];
        let Some(close) = after.find(']') else {
            break;
        };
        let parsed: Option<Vec<bool>> = after[..close]
            .split(',')
            .map(|item| match item.trim().trim_matches(['"', '\'']) {
                "1" | "true" | "True" => Some(true),
                "0" | "false" | "False" => Some(false),
                _ => None,
            })
            .collect();
        if let Some(values) = parsed.filter(|v| v.len() == expected) {
            found = Some(values);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surprisal_prompt_ends_where_the_excerpt_is_scored() {
        let prompt = surprisal_prompt("  Mentions of cats. ");
        assert!(prompt.ends_with("\n\nDescription:\nMentions of cats.\nSentences:\n"));
        // The demonstrations, then the description: four blocks, each with its sentences.
        assert_eq!(
            prompt.matches("Description:\n").count(),
            1 + SURPRISAL_SHOTS.len()
        );
        assert!(prompt.contains("Sentences:\nFishing boats"));
        assert!(surprisal_prompt(SURPRISAL_PLACEHOLDER).ends_with(&format!(
            "Description:\n{SURPRISAL_PLACEHOLDER}\nSentences:\n"
        )));
    }

    #[test]
    fn simulation_prompt_shows_each_token_on_its_own_line_with_its_level_hidden() {
        let tokens: Vec<String> = ["The", " cat\n", "\ta\\n", " sat"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        // The model's belief is read after each tab; only the first piece has no placeholder.
        assert_eq!(
            simulation_answer(&tokens),
            [
                "The\t",
                "unknown\n cat\\n\t",
                "unknown\n\\ta\\\\n\t",
                "unknown\n sat\t"
            ]
        );
        assert!(simulation_answer(&[]).is_empty());
        let messages = simulation_messages("  Mentions of cats. ");
        assert_eq!(messages.len(), 2 + 2 * SIMULATION_SHOTS.len());
        assert_eq!(
            messages.last().unwrap().content,
            "Feature description: Mentions of cats."
        );
        // Demonstrations: one line per token, a tab, a level the scorer reads (one digit).
        for shot in messages[2..].iter().step_by(2) {
            for line in shot.content.lines() {
                let (_, level) = line.split_once('\t').unwrap();
                assert!(SIMULATION_LEVELS.contains(&level), "{line:?}");
            }
        }
        assert!(messages[0]
            .content
            .contains("from 0 (not active) to 9 (most active)"));
    }

    #[test]
    fn intruder_prompt_numbers_the_excerpts_and_the_answer_is_read_after_the_marker() {
        let excerpts = vec!["a<< b>>".to_string(), "c d".to_string()];
        let messages = intruder_messages(&excerpts);
        assert_eq!(messages.len(), 6);
        let last = &messages.last().unwrap().content;
        assert_eq!(last, "Excerpts:\nExample 0: a<< b>>\nExample 1: c d");
        // The few-shot answers parse to their intruders.
        for (shots, expected) in INTRUDER_SHOTS.iter().zip([2, 3]) {
            let shown = shots.0.lines().count();
            assert_eq!(parse_intruder(shots.1, shown), Some(expected));
        }
        assert_eq!(parse_intruder("odd one: [RESPONSE]:  1\n", 2), Some(1));
        assert_eq!(parse_intruder("[RESPONSE]: 2", 2), None);
        assert_eq!(parse_intruder("[RESPONSE]: two", 2), None);
        assert_eq!(parse_intruder("Example 1 is the odd one", 2), None);
        // The last answer counts, not a guess in the reasoning before it.
        assert_eq!(
            parse_intruder("<think>[RESPONSE]: 0 maybe?</think>\n[RESPONSE]: 3", 4),
            Some(3)
        );
        assert_eq!(
            parse_intruder(
                "I would write [RESPONSE]: then the number. [RESPONSE]: 1",
                4
            ),
            Some(1)
        );
        assert_eq!(parse_intruder("[RESPONSE]: 1 ... [RESPONSE]: 9", 4), None);
    }

    fn example(tokens: &[&str], activations: &[f32]) -> ShownExample {
        let max = 10.0;
        ShownExample {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            activations: activations.to_vec(),
            normalized: activations
                .iter()
                .map(|a| (10.0 * a / max as f32).ceil() as u8)
                .collect(),
        }
    }

    #[test]
    fn runs_above_threshold_are_wrapped_once() {
        let e = example(
            &["The", " big", " red", " dog", " ran"],
            &[0.0, 5.0, 4.0, 1.0, 9.0],
        );
        // Threshold 0.3 * 9 = 2.7: " big red" is one run, " ran" another, " dog" is below.
        let marked = active_tokens(&e.activations);
        assert_eq!(highlight(&e.tokens, &marked), "The<< big red>> dog<< ran>>");
        assert_eq!(
            activation_line(&e, &marked),
            "Activations: (\" big\" : 5), (\" red\" : 4), (\" ran\" : 9)"
        );
    }

    #[test]
    fn explainer_prompt_golden() {
        let examples = [
            example(&["I", " like", " cats"], &[0.0, 0.0, 10.0]),
            example(&["Two", " cats", " slept"], &[0.0, 6.0, 0.0]),
        ];
        let messages = explainer_messages(&examples, true);
        assert_eq!(messages.len(), 6);
        assert_eq!(
            messages[5].content,
            "Example 1: I like<< cats>>\nActivations: (\" cats\" : 10)\n\
             Example 2: Two<< cats>> slept\nActivations: (\" cats\" : 6)"
        );
        let without = explainer_messages(&examples, false);
        assert!(!without.iter().any(|m| m.content.contains("Activations: (")));
        assert!(messages[0]
            .content
            .ends_with("followed by the description."));
    }

    #[test]
    fn the_last_marker_wins() {
        assert_eq!(
            parse_explanation("Thinking... I will write [EXPLANATION]: later.\n[EXPLANATION]:  Cat words.\nThanks"),
            Some("Cat words.".to_string())
        );
        assert_eq!(parse_explanation("No marker here"), None);
        assert_eq!(
            parse_explanation("[EXPLANATION]: Dates.\n[EXPLANATION]:"),
            Some("Dates.".to_string())
        );
        assert_eq!(
            parse_explanation("[EXPLANATION]:\n  Dates.\n"),
            Some("Dates.".to_string())
        );
        assert_eq!(parse_explanation("[EXPLANATION]:   \n"), None);
    }

    #[test]
    fn classifier_prompt_golden_and_answers() {
        let messages = classifier_messages(
            ClassifierTask::Detection,
            "Cats.",
            &["a cat".to_string(), "a car".to_string()],
        );
        assert_eq!(
            messages[3].content,
            "Feature description: Cats.\n\nExcerpts:\nExample 0: a cat\nExample 1: a car"
        );
        assert_eq!(
            parse_predictions("[1, 0, 1]", 3),
            Some(vec![true, false, true])
        );
        assert_eq!(
            parse_predictions("Sure: [true,false]", 2),
            Some(vec![true, false])
        );
        // A bracket with the wrong count is passed over for a later one.
        assert_eq!(
            parse_predictions("for [3] excerpts: [0, 1, 1]", 3),
            Some(vec![false, true, true])
        );
        assert_eq!(parse_predictions("[1, 0]", 3), None);
        assert_eq!(parse_predictions("[1, 2, 0]", 3), None);
        assert_eq!(parse_predictions("1, 0, 1", 3), None);
        // A reasoning draft before the answer is not taken: the last well-formed list is.
        assert_eq!(
            parse_predictions(
                "<think>First guess: [1, 1, 1]. Let me check again.</think>\n[1, 0, 0]",
                3
            ),
            Some(vec![true, false, false])
        );
        assert_eq!(
            parse_predictions("[0, 1, 1] because example [2] is about cats", 3),
            Some(vec![false, true, true])
        );
        assert_eq!(
            parse_predictions("[1, 0, 1] then an unclosed [", 3),
            Some(vec![true, false, true])
        );
    }
}
